"""The runtime against PyTorch on the real photos, and against birder's own ``infer_image`` (golden files)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pvt_deploy import Runtime
from pvt_deploy.export.parity import PARITY_THRESHOLDS

GOLDEN = Path(__file__).resolve().parent / "golden"
FP32 = PARITY_THRESHOLDS["fp32"]


@pytest.fixture(scope="module")
def torch_outputs(tiny_checkpoint: Path, model_dir: Path, photo_paths: list[Path]) -> dict[str, np.ndarray]:
    """PyTorch on the very tensor the runtime builds (preprocessing parity is tested against birder separately)."""
    import torch

    from pvt_deploy.model.checkpoint import load_checkpoint

    model = load_checkpoint(tiny_checkpoint).model.eval()
    batch = torch.from_numpy(Runtime(model_dir, device="cpu").preprocess(photo_paths))
    with torch.no_grad():
        embedding = model.embedding(batch)
        probabilities = torch.softmax(model.classify(embedding), dim=1)
        features = model.detection_features(batch)
    return {
        "probabilities": probabilities.numpy(),
        "embedding": embedding.numpy(),
        **{name: value.numpy() for name, value in features.items()},
    }


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64 * b64).sum(1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1))


@pytest.mark.parametrize("batch_size", [1, 4])
def test_fp32_parity_with_pytorch(
    model_dir: Path, photo_paths: list[Path], torch_outputs: dict[str, np.ndarray], batch_size: int
) -> None:
    runtime = Runtime(model_dir, device="cpu", batch_size=batch_size)
    probabilities, classify_embedding = runtime.classify(photo_paths, return_embedding=True)
    assert np.abs(probabilities - torch_outputs["probabilities"]).max() <= FP32["probabilities_max_abs"]
    assert _cosine(classify_embedding, torch_outputs["embedding"]).min() >= FP32["embedding_cosine_min"]
    assert _cosine(runtime.embed(photo_paths), torch_outputs["embedding"]).min() >= FP32["embedding_cosine_min"]
    for name, value in runtime.features(photo_paths).items():
        assert np.abs(value - torch_outputs[name]).max() <= FP32["features_max_abs"], name
    # the probabilities are not near-uniform, so the check above means something
    assert torch_outputs["probabilities"].max() > 0.3


def test_predict_matches_pytorch_ranking(
    model_dir: Path, photo_paths: list[Path], torch_outputs: dict[str, np.ndarray]
) -> None:
    runtime = Runtime(model_dir, device="cpu")
    answers = runtime.predict(photo_paths, top_k=1)
    expected = [runtime.labels[int(i)] for i in torch_outputs["probabilities"].argmax(1)]
    assert [answer[0][0] for answer in answers] == expected


def test_classify_on_a_path_agrees_with_birder_infer_image(tmp_path: Path) -> None:
    """birder 0.8.4's ``infer_image`` on the same photo with its own checkpoint (dev/make_goldens.py)."""
    goldens = GOLDEN / "goldens.json"
    assert goldens.is_file(), "tests/golden/ is missing; run dev/make_goldens.py with the birder venv"
    spec = json.loads(goldens.read_text())
    from tests.fixtures.exported import export_tiny

    folder = export_tiny(GOLDEN / spec["checkpoint"]["file"], tmp_path / "birder_tiny")
    expected = np.load(GOLDEN / spec["infer_image"]["file"])
    photo = Path(__file__).resolve().parent / "data" / "photos" / spec["infer_image"]["photo"]
    probabilities, embedding = Runtime(folder, device="cpu").classify(str(photo), return_embedding=True)
    assert np.abs(probabilities - expected["probabilities"]).max() <= FP32["probabilities_max_abs"]
    assert _cosine(embedding, expected["embedding"]).min() >= FP32["embedding_cosine_min"]
    assert expected["probabilities"].max() > 0.2  # a peaked answer: agreement is not an accident
