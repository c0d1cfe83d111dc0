"""The shared external-data weights also load on onnxruntime's CUDA provider (skipped without a GPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from pvt_deploy.format.manifest import GRAPH_OUTPUTS, INPUT_NAME


@pytest.mark.gpu
def test_shared_weights_graphs_run_on_cuda(tiny_export_dir: Path) -> None:
    x = np.random.default_rng(0).standard_normal((3, 3, 64, 64), dtype=np.float32)
    for graph in GRAPH_OUTPUTS:
        path = str(tiny_export_dir / f"{graph}.onnx")
        cuda = ort.InferenceSession(path, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        assert cuda.get_providers()[0] == "CUDAExecutionProvider"
        cpu = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        for a, b in zip(cuda.run(None, {INPUT_NAME: x}), cpu.run(None, {INPUT_NAME: x}), strict=True):
            assert np.abs(a - b).max() <= 1e-3
