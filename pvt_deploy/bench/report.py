"""Bench results as a text table, a JSON file and a PNG plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pvt_deploy.bench.machine import cpu_line

COLUMNS = (
    ("variant", "variant", "{}"),
    ("batch", "batch", "{}"),
    ("p50_ms", "p50 ms", "{:.1f}"),
    ("p95_ms", "p95 ms", "{:.1f}"),
    ("ms_per_image", "ms/img", "{:.1f}"),
    ("images_per_s", "img/s", "{:.2f}"),
    ("gflop_per_s", "GFLOP/s", "{:.1f}"),
    ("limit", "limit", "{}"),
    ("limit_fraction", "%limit", "{:.0%}"),
    ("speedup_vs_eager", "x eager", "{:.2f}"),
    ("calls", "calls", "{}"),
    ("rss_peak_mb", "RSS MB", "{:.0f}"),
)


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)


def load_line(result: dict[str, Any]) -> str:
    """The load the run saw; a loaded run says so in capitals, since its figures are noisy."""
    load = result.get("load") or {}
    seen = f"load average (1/5/15 min) at start {load.get('start')}, at end {load.get('end')}"
    if load.get("loaded"):
        return f"LOADED RUN ({load.get('why')}): figures are noisy, other processes shared the cores; {seen}"
    return f"quiet run: {seen}"


def format_table(result: dict[str, Any]) -> str:
    """The CPU and load lines, speed rows (each with its share of its own GEMM limit next to its speed-up), then one
    line per variant with cold start and fidelity, then the limits."""
    header = [title for _, title, _ in COLUMNS]
    rows = [[_cell(row.get(key), fmt) for key, _, fmt in COLUMNS] for row in result["runs"]]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = [cpu_line(result["machine"]), load_line(result)]
    lines.append("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.append("")
    lines.append("variant: cold start (creation -> first answer), fidelity vs PyTorch fp32 on the bench inputs")
    for key, variant in result["variants"].items():
        fidelity = variant.get("fidelity") or {}
        lines.append(
            f"  {key}: cold {variant['cold_start_s']:.2f} s"
            + (
                f"; embedding cosine mean {fidelity['embedding_cosine_mean']:.6f} min "
                f"{fidelity['embedding_cosine_min']:.6f}, top-1 agreement {fidelity['top1_agreement']:.0%}"
                + (
                    f", largest fp32 logit margin at a changed top-1 {fidelity['flip_margin_max']:.3f}"
                    if "flip_margin_max" in fidelity
                    else ""
                )
                if fidelity
                else ""
            )
        )
    for key, reason in result["skipped"].items():
        lines.append(f"  {key}: skipped ({reason})")
    for threads, limits in (result.get("limits") or {}).items():
        rates = ", ".join(f"{name} {limit['gflop_per_s']:.1f}" for name, limit in limits.items())
        lines.append(f"limits on {threads} threads (GFLOP/s, median of before/after runs): {rates}")
    model = result["model"]
    lines.append(
        f"model: {model['network']} at {model['size'][0]}x{model['size'][1]}, "
        f"{model['gflop_per_image']:.2f} GFLOP/image"
        f" ({model['gflop_per_image_with_attention_products']:.2f} with the attention products)"
    )
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=_json_default) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def write_plot(result: dict[str, Any], path: Path) -> Path:
    """Left: images/s by batch size per variant, each bar labelled with its share of its own limit and its speed-up,
    with the GEMM-bound ceilings; right: ms per image. A loaded run says so in the title, in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    variants = list(dict.fromkeys(row["variant"] for row in runs))
    batches = sorted({row["batch"] for row in runs})
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    width = 0.8 / max(1, len(variants))
    for i, variant in enumerate(variants):
        by_batch = {row["batch"]: row for row in runs if row["variant"] == variant}
        xs = [b + (i - (len(variants) - 1) / 2) * width for b in range(len(batches))]
        bars = left.bar(
            xs, [by_batch[b]["images_per_s"] if b in by_batch else 0 for b in batches], width, label=variant
        )
        for bar, batch in zip(bars, batches, strict=True):
            row = by_batch.get(batch, {})
            cells = (_cell(row.get("limit_fraction"), "{:.0%} lim"), _cell(row.get("speedup_vs_eager"), "{:.2f}x"))
            label = "\n".join(cell for cell in cells if cell != "-")
            if label:
                left.annotate(
                    label,
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    xytext=(0, 2),
                    textcoords="offset points",
                    ha="center",
                    va="bottom",
                    fontsize=6,
                )
        right.bar(xs, [by_batch[b]["ms_per_image"] if b in by_batch else 0 for b in batches], width, label=variant)
    gflop = result["model"]["gflop_per_image"]
    lines = [
        (name, threads, limit)
        for threads, limits in (result.get("limits") or {}).items()
        for name, limit in limits.items()
    ]
    for index, (name, threads, limit) in enumerate(lines):
        left.axhline(limit["gflop_per_s"] / gflop, linestyle="--", color="gray", linewidth=0.8)
        x = (index + 0.5) / max(1, len(lines))  # spread along the axis: close limits must not print on each other
        left.text(
            x,
            limit["gflop_per_s"] / gflop,
            f"{name}-bound ({threads}t)",
            va="bottom",
            ha="center",
            fontsize=7,
            transform=left.get_yaxis_transform(),
        )
    model = result["model"]
    title = f"{model['network']} {model['size'][0]}x{model['size'][1]} on {result['machine']['processor']}"
    for axis, label in ((left, "images / s (higher is better)"), (right, "ms per image, median (lower is better)")):
        axis.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
        axis.set_ylabel(label)
        axis.grid(axis="y", alpha=0.3)
    left.legend(fontsize=8)
    loaded = bool((result.get("load") or {}).get("loaded"))
    load = result.get("load") or {}
    load_note = (
        f"LOADED RUN: load average {load.get('start')} at start, {load.get('end')} at end; figures are noisy"
        if loaded
        else f"quiet run: load average {load.get('start')} at start, {load.get('end')} at end"
    )
    fig.suptitle(
        title + "\n" + cpu_line(result["machine"]) + "\n" + load_note,
        fontsize=9,
        color="red" if loaded else "black",
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
