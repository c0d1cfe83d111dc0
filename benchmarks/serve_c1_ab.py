"""One client's latency, interleaved request by request: in-process ``Runtime.classify`` against ``pvt-deploy serve``
with the default batching and with batching off (``--max-batch 1 --max-wait-ms 0``).

``serve_load.py`` runs its callers in blocks (all in-process calls, then each concurrency), so a drift of the machine
between blocks lands in the difference; here the three callers alternate call by call, the way the issue's target
("one client's p50 within in-process + 15 ms") is meant. Records the CPU and the load average at start and end.

    python benchmarks/serve_c1_ab.py MODEL_DIR [--calls 40] [--threads 2] [--out JSON]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import ServerProcess  # noqa: E402

from pvt_deploy import Runtime  # noqa: E402
from pvt_deploy.bench.machine import cpu_summary  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PHOTO = ROOT / "tests" / "data" / "photos" / "chelsea.png"


def start_server(model_dir: Path, threads: int, options: list[str]) -> tuple[ServerProcess, httpx.Client]:
    server = ServerProcess(model_dir, ["--device", "cpu", "--threads", str(threads), *options])
    return server, httpx.Client(base_url=server.url, timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--calls", type=int, default=40, help="timed calls per caller")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_c1_ab.json")
    args = parser.parse_args()
    image = PHOTO.read_bytes()
    servers = {
        "serve_default": start_server(args.model_dir, args.threads, []),
        "serve_max_batch_1": start_server(args.model_dir, args.threads, ["--max-batch", "1", "--max-wait-ms", "0"]),
    }
    runtime = Runtime(args.model_dir, device="cpu", threads=args.threads)

    def call(name: str) -> None:
        if name == "in_process":
            runtime.classify(image)
            return
        response = servers[name][1].post("/v1/classify", content=image, headers={"content-type": "image/*"})
        response.raise_for_status()

    callers = ["in_process", *servers]
    for name in callers:  # warm-up, untimed
        for _ in range(3):
            call(name)
    load_start = os.getloadavg()
    latencies: dict[str, list[float]] = {name: [] for name in callers}
    for _ in range(args.calls):
        for name in callers:
            started = time.perf_counter()
            call(name)
            latencies[name].append(time.perf_counter() - started)
    load_end = os.getloadavg()
    for server, client in servers.values():
        client.close()
        server.stop()
    p50 = {name: round(statistics.median(values) * 1000, 1) for name, values in latencies.items()}
    result = {
        "model_dir": str(args.model_dir),
        "cpu": cpu_summary(),
        "threads": args.threads,
        "calls": args.calls,
        "p50_ms": p50,
        "p95_ms": {name: round(sorted(v)[int(0.95 * (len(v) - 1))] * 1000, 1) for name, v in latencies.items()},
        "over_in_process_ms": {name: round(p50[name] - p50["in_process"], 1) for name in servers},
        "load_average_at_start": [round(x, 2) for x in load_start],
        "load_average_at_end": [round(x, 2) for x in load_end],
        "loaded": load_start[0] > 1.0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
