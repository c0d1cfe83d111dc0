"""Instances x threads for ``pvt-deploy serve``: images/s at one concurrency for each server layout, interleaved.

Both servers run at once (an idle one costs memory, not CPU); rounds alternate their order (A B, B A, ...) so a
shared machine's changing load biases every layout alike. Each block is ``--per-block`` raw-image requests to
/v1/classify from ``--concurrency`` callers (``serve_load.http_block``); the load average is recorded beside every
block. Throughput is the median over rounds.

    python benchmarks/serve_instances.py MODEL_DIR [--layouts 1x2 2x1] [--concurrency 8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import httpx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import PHOTOS, ServerProcess, http_block, percentiles  # noqa: E402

from pvt_deploy.bench.machine import cpu_summary  # noqa: E402
from pvt_deploy.format.manifest import load_manifest  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "serve_instances.json"


def layout_options(layout: str) -> list[str]:
    """``"2x1"`` -> ``--instances 2 --threads 1``."""
    instances, threads = (int(part) for part in layout.split("x"))
    return ["--instances", str(instances), "--threads", str(threads)]


def mean_batch_rows(url: str) -> float | None:
    """Rows per model call over the server's life (warm-up included), from its /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    count = re.search(r"^pvt_batch_size_count (\S+)$", text, re.M)
    total = re.search(r"^pvt_batch_size_sum (\S+)$", text, re.M)
    if not (count and total and float(count.group(1))):
        return None
    return round(float(total.group(1)) / float(count.group(1)), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--layouts", nargs="+", default=["1x2", "2x1"], help="INSTANCESxTHREADS")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--per-block", type=int, default=16, help="requests per layout per round")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--time-cap-s", type=float, default=300.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    images = [path.read_bytes() for path in PHOTOS]
    common = ["--device", "cpu", "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)]
    servers = {layout: ServerProcess(args.model_dir, [*common, *layout_options(layout)]) for layout in args.layouts}
    deadline = time.monotonic() + args.time_cap_s
    pooled: dict[str, dict[str, list]] = {layout: {"latencies": [], "errors": [], "rates": []} for layout in servers}
    blocks: list[dict[str, object]] = []
    try:
        for server in servers.values():  # warm-up: sessions' first runs, connections, arenas
            http_block(server.url, images, args.concurrency, args.concurrency, deadline)
        for round_index in range(args.rounds):
            order = args.layouts if round_index % 2 == 0 else args.layouts[::-1]
            for layout in order:
                load_before = os.getloadavg()[0]
                result = http_block(servers[layout].url, images, args.concurrency, args.per_block, deadline)
                entry = pooled[layout]
                entry["latencies"] += result["latencies"]
                entry["errors"] += result["errors"]
                entry["rates"].append(result["images_per_s"])
                blocks.append({
                    "round": round_index, "layout": layout, "images_per_s": round(result["images_per_s"], 3),
                    "requests": len(result["latencies"]), "load1_before": round(load_before, 2),
                    "load1_after": round(os.getloadavg()[0], 2),
                })  # fmt: skip
                print(json.dumps(blocks[-1]), file=sys.stderr, flush=True)
        rss = {layout: round(server.rss_mb(), 1) for layout, server in servers.items()}
        batch_rows = {layout: mean_batch_rows(server.url) for layout, server in servers.items()}
    finally:
        exit_codes = {layout: server.stop() for layout, server in servers.items()}

    summary = {
        layout: {
            "images_per_s_median": round(statistics.median(entry["rates"]), 3) if entry["rates"] else None,
            "images_per_s_by_round": [round(rate, 3) for rate in entry["rates"]],
            "requests": len(entry["latencies"]) + len(entry["errors"]),
            "errors": len(entry["errors"]),
            **(percentiles(entry["latencies"]) if entry["latencies"] else {}),
            "server_rss_mb_at_end": rss[layout],
            "mean_batch_rows": batch_rows[layout],
        }
        for layout, entry in pooled.items()
    }
    report = {
        "model": load_manifest(args.model_dir).model_name,
        "cpu": cpu_summary(),
        "cores": os.cpu_count(),
        "onnxruntime": ort.__version__,
        "python": platform.python_version(),
        "concurrency": args.concurrency,
        "server_options": common,
        "results": summary,
        "blocks": blocks,
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "server_exit_codes": exit_codes,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
