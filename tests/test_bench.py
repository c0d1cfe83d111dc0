"""``pvt-deploy bench`` on the tiny export: valid JSON and PNG, every variant timed; no speed is asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from pvt_deploy.bench.flops import flops_per_image
from pvt_deploy.bench.machine import cpu_line, parse_cpuinfo
from pvt_deploy.bench.measure import limit_for, load_record, ort_gemm_rate, percentile, summarize
from pvt_deploy.bench.report import format_table, load_line
from pvt_deploy.cli import cli
from pvt_deploy.model.pvt_v2 import PVT_V2_CONFIGS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_flops_match_the_published_counts() -> None:
    b2 = PVT_V2_CONFIGS["pvt_v2_b2"]
    # 22.8 GFLOP at 384 is the figure the speed targets use (weights only, as fvcore counts)
    assert flops_per_image(b2, (384, 384), 550) / 1e9 == pytest.approx(22.8, abs=0.05)
    # PVT v2 paper: b2 is 4.0 GMACs at 224 (with attention products), b0 0.6 GMACs
    assert flops_per_image(b2, (224, 224), 1000, attention_products=True) / 2e9 == pytest.approx(4.0, abs=0.1)
    b0 = PVT_V2_CONFIGS["pvt_v2_b0"]
    assert flops_per_image(b0, (224, 224), 1000, attention_products=True) / 2e9 == pytest.approx(0.6, abs=0.05)


def test_percentile_and_summary() -> None:
    samples = [0.4, 0.1, 0.2, 0.3]
    assert percentile(samples, 50) == 0.2
    assert percentile(samples, 95) == 0.4
    row = summarize(samples, batch=2, flops_per_image=1e9)
    assert row["p50_ms"] == pytest.approx(250.0)
    assert row["images_per_s"] == pytest.approx(8.0)
    assert row["gflop_per_s"] == pytest.approx(8.0)


VNNI_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8

processor\t: 1
model name\t: second block is ignored
"""


def test_cpu_flags_are_parsed_and_named_in_the_cpu_line() -> None:
    cpu = parse_cpuinfo(VNNI_CPUINFO)
    assert cpu["model_name"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert (cpu["family"], cpu["model"]) == ("6", "143")
    assert cpu["flags"] == ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile"]
    line = cpu_line({"cpu": cpu, "logical_cpus": 2, "onnxruntime": "1.2", "torch": "2.3"})
    assert "Platinum 8480+, family 6 model 143" in line and "amx_int8" in line and "(no " not in line
    avx2_only = parse_cpuinfo("model name\t: AMD EPYC\nflags\t\t: sse2 avx avx2 fma\n")
    assert "flags: avx2 fma (no avx512f/avx512_vnni/amx_int8)" in cpu_line({"cpu": avx2_only})


def _check_result(result: dict, batches: list[int], variants: set[str]) -> None:
    assert {row["batch"] for row in result["runs"]} == set(batches)
    assert {row["variant"].split("@")[0] for row in result["runs"]} == variants
    for row in result["runs"]:
        assert row["calls"] >= 1
        assert row["p95_ms"] >= row["p50_ms"] > 0
        assert row["images_per_s"] > 0
        assert row["gemm_fraction"] > 0
        assert row["rss_peak_mb"] > 0
        # every CPU variant is held against its own limit, next to its speed-up
        assert row["limit"] == limit_for(row["engine"], row["precision"], row["device"])
        assert row["limit_fraction"] == pytest.approx(row["gflop_per_s"] / row["limit_gflop_per_s"])
        assert row["speedup_vs_eager"] > 0
        assert row["loaded"] is result["load"]["loaded"]
    assert {"start", "end", "loaded", "why", "rule"} <= set(result["load"])
    for limits in result["limits"].values():
        assert set(limits) == {"torch-sgemm", "mlas-sgemm", "mlas-u8s8"}
        assert all(limit["gflop_per_s"] > 0 for limit in limits.values())
    for key, variant in result["variants"].items():
        assert variant["cold_start_s"] > 0
        if key.startswith("ort-cpu-fp32"):
            assert variant["fidelity"]["embedding_cosine_min"] > 0.99999
            assert variant["fidelity"]["top1_agreement"] == 1.0
            assert variant["fidelity"]["flip_margin_max"] == 0.0  # no top-1 changed
    assert all(g["gflop_per_s"] > 0 for g in result["gemm"].values())


def test_bench_quick_on_tiny_export_writes_json_and_png(tiny_export_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "results" / "tiny.json"
    result = CliRunner().invoke(
        cli, ["bench", str(tiny_export_dir), "--quick", "--threads", "1", "--out", str(out)], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    _check_result(data, [1, 2], {"torch-eager-cpu", "ort-cpu-fp32"})
    assert data["settings"]["interleaved"] is True
    assert out.with_suffix(".png").read_bytes()[:8] == PNG_MAGIC
    assert "x eager" in result.output and "%limit" in result.output and "limits on 1 threads" in result.output
    assert load_line(data) in result.output
    machine = data["machine"]
    assert machine["onnxruntime"] and machine["torch"] and isinstance(machine["cpu"]["flags"], list)
    assert cpu_line(machine) in result.output  # the table opens with the CPU it was measured on


def test_spin_wait_variants_are_timed_beside_the_default_ones(tiny_export_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "spin.json"
    args = ["bench", str(tiny_export_dir), "--quick", "--no-eager", "--batch-sizes", "1", "--spin-wait", "--out"]
    result = CliRunner().invoke(cli, [*args, str(out), "--threads", "1,2"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    variants = {run["variant"] for run in data["runs"]}
    assert {"ort-cpu-fp32@2t", "ort-cpu-fp32-spin@2t", "ort-cpu-fp32@1t"} <= variants
    assert "ort-cpu-fp32-spin@1t" not in variants  # one thread has no pool to spin
    assert data["settings"]["spin_wait_variants"] is True


def test_limits_per_variant() -> None:
    assert limit_for("pytorch-eager", "fp32", "cpu") == "torch-sgemm"
    assert limit_for("torch-compile", "fp32", "cpu") == "torch-sgemm"
    assert limit_for("onnxruntime", "fp32", "cpu") == "mlas-sgemm"
    assert limit_for("onnxruntime", "int8", "cpu") == "mlas-u8s8"
    assert limit_for("onnxruntime", "fp16", "cuda") is None


@pytest.mark.parametrize("kind", ["fp32", "u8s8"])
def test_onnxruntime_gemm_rates_are_measured(kind: str) -> None:
    rate = ort_gemm_rate(1, kind, calls=2, size=128)
    assert rate["best_gflop_per_s"] >= rate["median_gflop_per_s"] > 0
    with pytest.raises(ValueError, match="unknown GEMM kind"):
        ort_gemm_rate(1, "fp8", calls=1, size=8)


def test_a_loaded_run_is_marked_in_json_table_and_plot(tmp_path: Path) -> None:
    quiet = load_record([0.3, 0.2, 0.1], [2.4, 1.0, 0.5], own_threads=2)  # its own 2 threads do not count
    assert quiet["loaded"] is False and quiet["why"] is None
    busy_start = load_record([13.0, 12.0, 11.0], [2.4, 1.0, 0.5], own_threads=2)
    assert busy_start["loaded"] is True and "13.00 at start" in busy_start["why"]
    busy_end = load_record([0.3, 0.2, 0.1], [5.0, 3.0, 1.0], own_threads=2)
    assert busy_end["loaded"] is True and "5.00 at end" in busy_end["why"]
    assert load_record(None, None, own_threads=1)["loaded"] is False  # no load average on this OS: not claimed

    from pvt_deploy.bench.report import write_plot

    row = {
        "variant": "ort-cpu-fp32@2t",
        "engine": "onnxruntime",
        "precision": "fp32",
        "device": "cpu",
        "batch": 1,
        "images_per_s": 2.0,
        "ms_per_image": 500.0,
        "limit": "mlas-sgemm",
        "limit_fraction": 0.55,
        "speedup_vs_eager": 2.1,
        "loaded": True,
    }
    result = {
        "machine": {"cpu": {"model_name": "Test CPU", "flags": ["avx2"]}, "processor": "Test CPU"},
        "model": {
            "network": "pvt_v2_b2",
            "size": [384, 384],
            "gflop_per_image": 22.8,
            "gflop_per_image_with_attention_products": 25.3,
        },
        "runs": [row],
        "variants": {},
        "skipped": {},
        "limits": {"2": {"mlas-sgemm": {"gflop_per_s": 80.0}}},
        "load": busy_start,
    }
    table = format_table(result)
    assert "LOADED RUN (load average 13.00 at start)" in table
    assert "55%" in table and "2.10" in table and "mlas-sgemm" in table
    result["load"] = quiet
    assert "quiet run" in format_table(result) and "LOADED" not in format_table(result)
    result["load"] = busy_start
    plot = write_plot(result, tmp_path / "loaded.png")
    assert plot.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.slow
def test_bench_quick_without_folder_exports_tiny_with_int8(tmp_path: Path) -> None:
    """What CI runs: `pvt-deploy bench --quick` builds its own seeded tiny export (fp32 + int8) and benches it."""
    out = tmp_path / "quick.json"
    plot = tmp_path / "quick-plot.png"
    result = CliRunner().invoke(cli, ["bench", "--quick", "--out", str(out), "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    _check_result(data, [1, 2], {"torch-eager-cpu", "ort-cpu-fp32", "ort-cpu-int8"})
    int8 = next(v for k, v in data["variants"].items() if k.startswith("ort-cpu-int8"))
    assert int8["fidelity"]["embedding_cosine_mean"] >= 0.999
    assert plot.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch-sizes", "1,x"], "--batch-sizes '1,x': expected comma-separated integers"),
        (["--batch-sizes", "0"], "expected positive integers"),
        (["--rounds", "0"], "--rounds must be >= 1"),
        ([], "give an exported MODEL_DIR"),
    ],
)
def test_bench_bad_options_are_one_line_errors(args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, ["bench", *args])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_bench_missing_folder_and_precision(tiny_export_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(cli, ["bench", str(tmp_path / "nope"), "--quick"])
    assert missing.exit_code == 2 and "not an exported folder" in missing.output
    no_int8 = runner.invoke(
        cli, ["bench", str(tiny_export_dir), "--quick", "--precision", "int8", "--out", str(tmp_path / "x.json")]
    )
    assert no_int8.exit_code == 2 and "no int8 graphs exported" in no_int8.output
    assert not (tmp_path / "x.json").exists()


@pytest.mark.gpu
def test_bench_quick_on_cuda(tiny_export_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cuda.json"
    result = CliRunner().invoke(cli, ["bench", str(tiny_export_dir), "--quick", "--device", "cuda", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert any(row["device"] == "cuda" for row in data["runs"])
    assert data["machine"].get("gpu")
