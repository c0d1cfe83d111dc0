"""Load on ``pvt-deploy serve`` over loopback at concurrency 1, 4 and 16, against in-process ``Runtime.classify``.

Bounded: a fixed number of requests (default 2,000 in all) and a wall-clock cap. Rounds are interleaved (in-process,
then each concurrency, every round) so a busy shared machine biases all of them alike; throughput is the median over
rounds, latency percentiles are over every request. Reports images/s, p50 / p95 / p99 latency, errors, and the
server's RSS before and after the requests. Client and server share this machine's CPU, as they would in a
sidecar deployment. Torch is not used.

    python benchmarks/serve_load.py MODEL_DIR [--requests 2000] [--time-cap-s 900] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import psutil

from pvt_deploy import Runtime
from pvt_deploy.bench.machine import cpu_summary
from pvt_deploy.format.manifest import load_manifest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "serve_load.json"
PHOTOS = sorted((ROOT / "tests" / "data" / "photos").glob("*.[pj][np]g"))
P50_MARGIN_MS = 15.0


class ServerProcess:
    """``pvt-deploy serve`` on a free loopback port."""

    def __init__(self, model_dir: Path, options: list[str]) -> None:
        command = [sys.executable, "-m", "pvt_deploy", "serve", str(model_dir), "--port", "0", *options]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.url = ""
        found = threading.Event()

        def drain() -> None:
            assert self.process.stderr is not None
            for line in self.process.stderr:
                match = re.search(r"running on (http://127\.0\.0\.1:\d+)", line)
                if match:
                    self.url = match.group(1)
                    found.set()

        threading.Thread(target=drain, daemon=True).start()
        if not found.wait(180):
            self.process.kill()
            raise SystemExit("the server did not start")

    def rss_mb(self) -> float:
        return psutil.Process(self.process.pid).memory_info().rss / 2**20

    def stop(self) -> int:
        self.process.terminate()
        return self.process.wait(timeout=120)


def percentiles(latencies_s: list[float]) -> dict[str, float]:
    values = np.asarray(latencies_s) * 1000
    return {f"p{q}_ms": round(float(np.percentile(values, q)), 2) for q in (50, 95, 99)}


def http_block(url: str, images: list[bytes], concurrency: int, count: int, deadline: float) -> dict[str, object]:
    """``count`` requests from ``concurrency`` callers, each with its own keep-alive connection."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    next_index = iter(range(count))

    clients = [httpx.Client(base_url=url, timeout=120) for _ in range(concurrency)]  # made before the clock starts

    def caller(client: httpx.Client) -> None:
        with client:
            while time.monotonic() < deadline:
                with lock:
                    index = next(next_index, None)
                if index is None:
                    return
                started = time.perf_counter()
                try:
                    response = client.post(
                        "/v1/classify", content=images[index % len(images)], headers={"content-type": "image/*"}
                    )
                    ok = response.status_code == 200
                    problem = f"HTTP {response.status_code}"
                except httpx.HTTPError as exc:
                    ok, problem = False, type(exc).__name__
                elapsed = time.perf_counter() - started
                with lock:
                    (latencies if ok else errors).append(elapsed if ok else problem)

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(caller, client) for client in clients]:
            future.result()
    wall = time.perf_counter() - started
    return {"latencies": latencies, "errors": errors, "images_per_s": len(latencies) / wall}


def in_process_block(runtime: Runtime, images: list[bytes], count: int, deadline: float) -> dict[str, object]:
    latencies: list[float] = []
    started = time.perf_counter()
    for index in range(count):
        if time.monotonic() >= deadline:
            break
        one = time.perf_counter()
        runtime.classify(images[index % len(images)])
        latencies.append(time.perf_counter() - one)
    return {"latencies": latencies, "errors": [], "images_per_s": len(latencies) / (time.perf_counter() - started)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--requests", type=int, default=2000, help="HTTP requests in all (after the warm-up)")
    parser.add_argument("--in-process", type=int, default=300, help="in-process classify calls in all")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--time-cap-s", type=float, default=900.0)
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads, server and in-process")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    images = [path.read_bytes() for path in PHOTOS]
    threads = ["--threads", str(args.threads)] if args.threads else []
    options = ["--device", "cpu", "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms), *threads]
    runtime = Runtime(args.model_dir, device="cpu", threads=args.threads).load()
    server = ServerProcess(args.model_dir, options)
    deadline = time.monotonic() + args.time_cap_s
    try:
        http_block(server.url, images, 4, 40, deadline)  # warm-up: connections, allocator, thread pools
        in_process_block(runtime, images, 10, deadline)
        rss_before = server.rss_mb()
        per_block = max(1, math.ceil(args.requests / (args.rounds * len(args.concurrency))))
        per_in_process = max(1, math.ceil(args.in_process / args.rounds))
        rss_by_round: list[float] = []
        pooled: dict[str, dict[str, list]] = {}
        for round_index in range(args.rounds):
            levels = args.concurrency if round_index % 2 == 0 else args.concurrency[::-1]
            blocks = [("in_process", None), *[(f"c{c}", c) for c in levels]]
            for name, concurrency in blocks:
                if concurrency is None:
                    result = in_process_block(runtime, images, per_in_process, deadline)
                else:
                    result = http_block(server.url, images, concurrency, per_block, deadline)
                entry = pooled.setdefault(name, {"latencies": [], "errors": [], "images_per_s": []})
                entry["latencies"] += result["latencies"]
                entry["errors"] += result["errors"]
                entry["images_per_s"].append(result["images_per_s"])
                print(f"round {round_index} {name}: {result['images_per_s']:.1f} images/s", file=sys.stderr)
            rss_by_round.append(round(server.rss_mb(), 1))
        rss_after = server.rss_mb()
        metrics_text = httpx.get(f"{server.url}/metrics", timeout=30).text
    finally:
        exit_code = server.stop()

    batches = re.search(r"^pvt_batch_size_count (\S+)$", metrics_text, re.M)
    rows = re.search(r"^pvt_batch_size_sum (\S+)$", metrics_text, re.M)
    summary = {}
    for name, entry in pooled.items():
        summary[name] = {
            "requests": len(entry["latencies"]) + len(entry["errors"]),
            "errors": len(entry["errors"]),
            "images_per_s": round(statistics.median(entry["images_per_s"]), 2),
            **percentiles(entry["latencies"]),
        }
    http_requests = sum(v["requests"] for k, v in summary.items() if k != "in_process")
    baseline = summary["in_process"]
    first, last = f"c{min(args.concurrency)}", f"c{max(args.concurrency)}"
    report = {
        "model_dir": str(args.model_dir),
        "model": load_manifest(args.model_dir).model_name,
        "input_size": list(runtime.metadata["preprocess"]["size"]),
        "cpu": cpu_summary(),
        "cores": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "onnxruntime": ort.__version__,
        "python": platform.python_version(),
        "server_options": options,
        "rounds": args.rounds,
        "http_requests": http_requests,
        "results": summary,
        "mean_batch_rows": round(float(rows.group(1)) / float(batches.group(1)), 2) if batches and rows else None,
        "server_rss_mb": {
            "before": round(rss_before, 1),
            "after": round(rss_after, 1),
            "after_each_round": rss_by_round,
        },
        "server_exit_code_after_sigterm": exit_code,
        "targets": {
            f"{first}_p50_within_{P50_MARGIN_MS:g}ms_of_in_process": summary[first]["p50_ms"]
            <= baseline["p50_ms"] + P50_MARGIN_MS,
            f"{last}_throughput_at_least_in_process": summary[last]["images_per_s"] >= baseline["images_per_s"],
            "zero_errors": all(v["errors"] == 0 for v in summary.values()),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out.with_suffix(".png"))
    print(table(report))


def table(report: dict) -> str:
    lines = ["| caller | images/s | p50 ms | p95 ms | p99 ms | requests | errors |", "|---|---|---|---|---|---|---|"]
    for name, row in report["results"].items():
        label = "in-process `Runtime.classify`" if name == "in_process" else f"HTTP, concurrency {name[1:]}"
        lines.append(
            f"| {label} | {row['images_per_s']} | {row['p50_ms']} | {row['p95_ms']} | {row['p99_ms']} "
            f"| {row['requests']} | {row['errors']} |"
        )
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    http = {int(k[1:]): v for k, v in report["results"].items() if k != "in_process"}
    levels = sorted(http)
    baseline = report["results"]["in_process"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.plot(levels, [http[c]["images_per_s"] for c in levels], "o-", label="HTTP (serve)")
    left.axhline(baseline["images_per_s"], color="gray", linestyle="--", label="in-process, one caller")
    left.set(xscale="log", xticks=levels, xticklabels=levels, xlabel="concurrent callers", ylabel="images/s",
             title="Throughput (median over rounds)")  # fmt: skip
    left.set_ylim(bottom=0)
    left.legend()
    for q, style in (("p50", "o-"), ("p95", "s--"), ("p99", "^:")):
        right.plot(levels, [http[c][f"{q}_ms"] for c in levels], style, label=f"HTTP {q}")
    right.axhline(baseline["p50_ms"], color="gray", linestyle="--", label="in-process p50")
    right.set(xscale="log", xticks=levels, xticklabels=levels, xlabel="concurrent callers", ylabel="latency (ms)",
              title="Latency")  # fmt: skip
    right.set_ylim(bottom=0)
    right.legend()
    figure.suptitle(f"pvt-deploy serve, {report['model']} {report['input_size'][0]}px, {report['cpu']}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
