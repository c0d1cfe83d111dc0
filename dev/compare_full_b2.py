"""Full-size PVT v2 B2 (550 classes, 384x384) against birder 0.8.4, both directions. NOT run by CI.

Run from the repository root with the python of a venv holding birder 0.8.4 (``$BIRDER_PYTHON``); our side
runs in ``$PVT_DEPLOY_PYTHON`` (default ``.venv/bin/python``) as a subprocess::

    $BIRDER_PYTHON dev/compare_full_b2.py

1. birder builds pvt_v2_b2 (fixed seed, perturbed so outputs are not near-uniform) and saves it with its own
   ``fs_ops.checkpoint_model``; birder's logits, embedding and stage1..stage4 features on fixed inputs (random
   tensors and a real photo through birder's ``inference_preset``) are kept.
2. Our ``load_checkpoint`` loads birder's file; our model's outputs (photo through OUR preprocessing) are compared.
   Our ``save_checkpoint`` then writes the model again.
3. birder's ``load_model`` loads our file; its outputs are compared with ours.

Checkpoints and arrays stay in a temp folder (~100 MB); only docs/parity-b2-birder.{md,json} are written.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
OUR_PYTHON = Path(os.environ.get("PVT_DEPLOY_PYTHON") or REPO / ".venv" / "bin" / "python")
"""pvt-deploy's venv, which runs our side: ``$PVT_DEPLOY_PYTHON``, else the repository's ``.venv``."""
PHOTO = REPO / "tests" / "data" / "photos" / "chelsea.png"
DOCS = REPO / "docs"
SEED = 0
NUM_CLASSES = 550
SIZE = (384, 384)
KEYS = ("logits", "embedding", "stage1", "stage2", "stage3", "stage4")


def perturb(net, seed: int) -> None:
    """Non-zero biases and LayerNorm affines and a wider head, so outputs differ per class and per input."""
    import torch

    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in net.named_parameters():
            if name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
            elif param.ndim == 1:
                param.copy_(1.0 + torch.randn(param.shape, generator=generator) * 0.1)
        net.classifier.weight.copy_(torch.randn(net.classifier.weight.shape, generator=generator) * 0.1)


def run_model(net, x) -> dict[str, np.ndarray]:
    import torch

    with torch.inference_mode():
        out = {"logits": net(x).numpy(), "embedding": net.embedding(x).numpy()}
        out.update({name: value.numpy() for name, value in net.detection_features(x).items()})
    return out


def differences(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    return {
        key: {
            "max_abs": float(np.abs(a[key] - b[key]).max()),
            "max_abs_value": float(np.abs(b[key]).max()),
        }
        for key in KEYS
    }


def stage_ours(workdir: Path) -> None:
    """In OUR venv: load birder's checkpoint, run it, save it again with save_checkpoint."""
    import torch

    sys.path.insert(0, str(REPO))
    from pvt_deploy.model.checkpoint import load_checkpoint, save_checkpoint
    from pvt_deploy.model.pvt_v2 import TRAINING_LAYER_NORM_EPS
    from pvt_deploy.preprocess import preprocess

    torch.set_num_threads(1)
    start = time.perf_counter()
    loaded = load_checkpoint(workdir / "birder_b2.pt")
    load_s = time.perf_counter() - start
    inputs = np.load(workdir / "inputs.npz")
    photo = preprocess(PHOTO, SIZE, loaded.rgb_stats)
    ours_random = run_model(loaded.model, torch.from_numpy(inputs["random"]))
    ours_photo = run_model(loaded.model, torch.from_numpy(photo))
    np.savez(workdir / "ours_random.npz", **ours_random)
    np.savez(workdir / "ours_photo.npz", **ours_photo)
    np.save(workdir / "ours_photo_input.npy", photo)
    eps_model = load_checkpoint(workdir / "birder_b2.pt", layer_norm_eps=TRAINING_LAYER_NORM_EPS).model
    eps_photo = run_model(eps_model, torch.from_numpy(photo))
    save_checkpoint(workdir / "ours_b2.pt", loaded.model, class_to_idx=loaded.class_to_idx, rgb_stats=loaded.rgb_stats)
    info = {
        "network": loaded.network,
        "num_classes": loaded.num_classes,
        "size": list(loaded.size),
        "num_params": int(sum(p.numel() for p in loaded.model.parameters())),
        "load_seconds": round(load_s, 2),
        "torch": torch.__version__,
        "eps_1e-5_vs_1e-6_on_photo": differences(eps_photo, ours_photo),
        "eps_top1_same": bool(eps_photo["logits"].argmax() == ours_photo["logits"].argmax()),
    }
    (workdir / "ours_info.json").write_text(json.dumps(info))


def stage_birder(workdir: Path) -> dict:
    import birder
    import torch
    from birder.common import fs_ops
    from birder.conf import settings
    from birder.data.transforms.classification import get_rgb_stats, inference_preset
    from birder.model_registry import registry
    from birder.net.base import get_signature
    from PIL import Image

    torch.set_num_threads(1)
    rgb_stats = get_rgb_stats("birder")
    class_to_idx = {f"species_{i:03d}": i for i in range(NUM_CLASSES)}

    torch.manual_seed(SEED)
    net = registry.net_factory("pvt_v2_b2", NUM_CLASSES, 3, size=SIZE)
    perturb(net, SEED)
    net.eval()
    settings.MODELS_DIR = workdir
    fs_ops.checkpoint_model(
        "birder_b2", 0, net, get_signature((1, 3, *SIZE), NUM_CLASSES), class_to_idx, rgb_stats,
        None, None, None, None,
    )  # fmt: skip
    fs_ops.model_path("birder_b2", epoch=0).rename(workdir / "birder_b2.pt")

    loaded, _ = fs_ops.load_model(torch.device("cpu"), "pvt_v2_b2", path=workdir / "birder_b2.pt", inference=True)
    random_inputs = np.random.default_rng(SEED).standard_normal((2, 3, *SIZE)).astype(np.float32)
    np.savez(workdir / "inputs.npz", random=random_inputs)
    with open(PHOTO, "rb") as handle:
        photo = inference_preset(SIZE, rgb_stats, 1.0)(Image.open(handle).convert("RGB")).unsqueeze(0)
    birder_random = run_model(loaded, torch.from_numpy(random_inputs))
    birder_photo = run_model(loaded, photo)

    subprocess.run([str(OUR_PYTHON), __file__, "--stage", "ours", "--workdir", str(workdir)], check=True)
    ours_info = json.loads((workdir / "ours_info.json").read_text())
    ours_random = dict(np.load(workdir / "ours_random.npz"))
    ours_photo = dict(np.load(workdir / "ours_photo.npz"))
    our_photo_input = np.load(workdir / "ours_photo_input.npy")

    reloaded, _ = fs_ops.load_model(torch.device("cpu"), "pvt_v2_b2", path=workdir / "ours_b2.pt", inference=True)
    birder_on_ours = run_model(reloaded, torch.from_numpy(random_inputs))
    state_equal = all(
        torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), reloaded.state_dict().values(), strict=True)
    )
    return {
        "versions": {"birder": birder.__version__, "birder_torch": torch.__version__, "our_torch": ours_info["torch"]},
        "model": {k: ours_info[k] for k in ("network", "num_classes", "size", "num_params")},
        "birder_file_in_ours": {
            "random_inputs": differences(ours_random, birder_random),
            "photo": differences(ours_photo, birder_photo),
            "photo_preprocessing_max_abs": float(np.abs(our_photo_input - photo.numpy()).max()),
            "top1_same_on_photo": bool(ours_photo["logits"].argmax() == birder_photo["logits"].argmax()),
        },
        "our_file_in_birder": {
            "random_inputs": differences(ours_random, birder_on_ours),
            "state_dict_identical": state_equal,
        },
        "layer_norm_eps": {
            "eps_1e-5_vs_1e-6_on_photo": ours_info["eps_1e-5_vs_1e-6_on_photo"],
            "top1_same": ours_info["eps_top1_same"],
        },
        "photo": PHOTO.name,
        "seed": SEED,
    }


def write_docs(result: dict) -> None:
    DOCS.mkdir(exist_ok=True)
    (DOCS / "parity-b2-birder.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = []
    for label, block in (
        ("birder's file in ours, random inputs (2x3x384x384)", result["birder_file_in_ours"]["random_inputs"]),
        ("birder's file in ours, real photo (chelsea.png)", result["birder_file_in_ours"]["photo"]),
        ("our saved file in birder, random inputs", result["our_file_in_birder"]["random_inputs"]),
        ("LayerNorm eps 1e-5 vs 1e-6 (ours), real photo", result["layer_norm_eps"]["eps_1e-5_vs_1e-6_on_photo"]),
    ):
        cells = " | ".join(f"{block[key]['max_abs']:.2e}" for key in KEYS)
        rows.append(f"| {label} | {cells} |")
    scale = result["birder_file_in_ours"]["random_inputs"]
    scales = " | ".join(f"{scale[key]['max_abs_value']:.3g}" for key in KEYS)
    model = result["model"]
    versions = result["versions"]
    text = f"""# Full PVT v2 B2 against birder 0.8.4

Measured by `dev/compare_full_b2.py` (birder {versions["birder"]} with torch {versions["birder_torch"]}; ours with
torch {versions["our_torch"]}; CPU, 1 thread). The model is {model["network"]} with {model["num_classes"]} classes at
{model["size"][0]}x{model["size"][1]} ({model["num_params"]:,} parameters), random weights with seed
{result["seed"]}, perturbed so that biases, LayerNorm affines and the head are not at their init values.
The real weights are not reachable from this machine; the comparison is of the code, and random weights exercise
every weight of it.

Max abs difference, per output:

| comparison | logits | embedding | stage1 | stage2 | stage3 | stage4 |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}
| (largest abs value in birder's output, random inputs) | {scales} |

- birder's own `checkpoint_model` file loads in our `load_checkpoint` (network inferred from shapes: pvt_v2_b2).
- Our `save_checkpoint` file loads in birder's `load_model`; state dict identical:
  {result["our_file_in_birder"]["state_dict_identical"]}.
- Our preprocessing of the photo vs birder's `inference_preset`: max abs
  {result["birder_file_in_ours"]["photo_preprocessing_max_abs"]:.1e}; same top-1 class:
  {result["birder_file_in_ours"]["top1_same_on_photo"]}.
- The eps row is not an error: it shows how far the 1e-5 LayerNorm convention (the published weights' training
  setting) moves outputs from birder 0.8.4's 1e-6 on these weights; same top-1: {result["layer_norm_eps"]["top1_same"]}.

Raw numbers: `docs/parity-b2-birder.json`.
"""
    (DOCS / "parity-b2-birder.md").write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=("birder", "ours"), default="birder")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    if args.stage == "ours":
        stage_ours(args.workdir)
        return
    with tempfile.TemporaryDirectory(prefix="pvt-b2-compare-") as tmp:
        result = stage_birder(Path(tmp))
    write_docs(result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
