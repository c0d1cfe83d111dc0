"""How much memory N model instances cost, by the way they share (or not) the weights: the question behind
``serve --instances`` (docs/serve-grpc.md).

Each variant runs in a fresh process: load the classify graph, run one batch-1 image on every instance at the same
time (so each instance's activations exist), then report RSS and USS (memory only this process holds).

- ``shared-1``: one session, one caller (``--instances 1``)
- ``shared-2``: one session, two callers at once (``--instances 2``: what serve does)
- ``separate-2``: two sessions, each loading the weights itself (two ``Runtime`` objects)
- ``separate-2-initializers``: two sessions whose external weights come from one read-only mapping of the weights
  file, handed to onnxruntime with ``SessionOptions.add_external_initializers`` (no copy of the raw weights;
  onnxruntime still pre-packs its own copy per session unless pre-packing is off)
- ``separate-2-initializers-noprepack``: the same with ``session.disable_prepacking``

Needs ``onnx`` (the [export] extra) for the last two, to read where each initializer lies in the weights file.

    python benchmarks/serve_instances_memory.py MODEL_DIR [--threads 1] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

VARIANTS = (
    "shared-1",
    "shared-2",
    "separate-2",
    "separate-2-initializers",
    "separate-2-initializers-noprepack",
)


def _external_initializers(graph: Path) -> tuple[list[str], list[object]]:
    """Every external-data initializer of ``graph`` as an OrtValue viewing a read-only memory map of its file."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import helper

    model = onnx.load(str(graph), load_external_data=False)
    maps: dict[str, np.memmap] = {}
    names, values = [], []
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        path = graph.parent / info["location"]
        mapped = maps.setdefault(info["location"], np.memmap(path, dtype=np.uint8, mode="r"))
        offset, length = int(info.get("offset", 0)), int(info["length"])
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        array = mapped[offset : offset + length].view(dtype).reshape(tuple(tensor.dims))
        names.append(tensor.name)
        values.append(ort.OrtValue.ortvalue_from_numpy(array))
    return names, values


def measure(model_dir: Path, variant: str, threads: int) -> dict[str, object]:
    """Runs in the child process."""
    import numpy as np
    import onnxruntime as ort
    import psutil

    from pvt_deploy import Runtime
    from pvt_deploy.runtime.sessions import CPU_PROVIDER, create_session, session_options

    if "initializers" in variant:
        import onnx  # noqa: F401  (imported before the baseline: its own memory is not the sessions')

    process = psutil.Process()
    before = process.memory_full_info()
    runtime = Runtime(model_dir, device="cpu", threads=threads)
    height, width = runtime.metadata["preprocess"]["size"]
    pixels = np.random.default_rng(0).standard_normal((1, 3, height, width)).astype(np.float32)
    graph = runtime.manifest.path(runtime.graph_entry("classify").file)
    keep: list[object] = []
    if variant.startswith("shared"):
        runtime.load(["classify"])
        sessions = [runtime.session("classify").session] * int(variant[-1])
    elif variant == "separate-2":
        sessions = [Runtime(model_dir, device="cpu", threads=threads).session("classify").session for _ in range(2)]
    else:
        names, values = _external_initializers(graph)
        keep.append(values)
        sessions = []
        for _ in range(2):
            options = session_options(threads)
            options.add_external_initializers(names, values)
            if variant.endswith("noprepack"):
                options.add_session_config_entry("session.disable_prepacking", "1")
            sessions.append(create_session(graph, [CPU_PROVIDER], threads, options))
    loaded = process.memory_full_info()
    input_name = sessions[0].get_inputs()[0].name
    answers: list[np.ndarray] = []

    def run(session: ort.InferenceSession) -> None:
        answers.append(session.run(None, {input_name: pixels})[0])

    workers = [threading.Thread(target=run, args=(session,)) for session in sessions]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    after = process.memory_full_info()
    same = all(np.allclose(answer, answers[0], atol=1e-6) for answer in answers)
    mb = 2**20
    return {
        "variant": variant,
        "instances": len(sessions),
        "threads": threads,
        "rss_loaded_mb": round((loaded.rss - before.rss) / mb, 1),
        "rss_after_run_mb": round((after.rss - before.rss) / mb, 1),
        "uss_after_run_mb": round((after.uss - before.uss) / mb, 1),
        "answers_agree": bool(same),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # the child process's job
    parser.add_argument("--out", type=Path)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, help="a subset (default: all)")
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.model_dir, args.variant, args.threads)))
        return
    rows = []
    for variant in args.variants or VARIANTS:
        command = [sys.executable, __file__, str(args.model_dir), "--threads", str(args.threads), "--variant", variant]
        done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=dict(os.environ))
        if done.returncode != 0:
            rows.append({"variant": variant, "error": done.stderr.strip().splitlines()[-1:]})
        else:
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    load = os.getloadavg()
    report = {"model_dir": str(args.model_dir), "loadavg_after": [round(x, 2) for x in load], "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
