"""``pvt-deploy bench`` on the tiny export: valid JSON and PNG, every variant timed; no speed is asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from pvt_deploy.bench.flops import flops_per_image
from pvt_deploy.bench.machine import cpu_line, parse_cpuinfo
from pvt_deploy.bench.measure import percentile, summarize
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
    for key, variant in result["variants"].items():
        assert variant["cold_start_s"] > 0
        if key.startswith("ort-cpu-fp32"):
            assert variant["fidelity"]["embedding_cosine_min"] > 0.99999
            assert variant["fidelity"]["top1_agreement"] == 1.0
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
    assert "x eager" in result.output and "sgemm on 1 threads" in result.output
    machine = data["machine"]
    assert machine["onnxruntime"] and machine["torch"] and isinstance(machine["cpu"]["flags"], list)
    assert cpu_line(machine) in result.output  # the table opens with the CPU it was measured on


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
