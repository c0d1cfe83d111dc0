"""Make the golden files in tests/golden/ from birder 0.8.4 itself. NOT run by CI.

Run from the repository root with the python of a venv holding birder 0.8.4 (``$BIRDER_PYTHON``); our side
runs in ``$PVT_DEPLOY_PYTHON`` (default ``.venv/bin/python``)::

    $BIRDER_PYTHON dev/make_goldens.py

It writes (all small, committed):

* ``birder_pvt_v2_tiny.pt``: a ``pvt_v2_tiny``-sized PVT v2 built by birder (network ``pvt_v2_b0`` + config
  override, 10 classes, 64x64, seed 0) and saved by birder's own ``fs_ops.checkpoint_model``.
* ``birder_pvt_v2_tiny_outputs.npz``: fixed inputs and birder's logits, embedding and stage1..stage4 features.
* ``birder_preprocess.npz``: birder's ``inference_preset`` tensors for the real photos in tests/data/photos.
* ``birder_infer_image.npz``: birder's ``infer_image`` probabilities + embedding for one photo.
* ``our_checkpoint_in_birder.json``: a checkpoint written by OUR ``save_checkpoint`` (``.venv`` python, run as a
  subprocess) loaded by birder's ``load_model``/``load_checkpoint``, with the max abs output differences.
* ``goldens.json``: versions and what each file holds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO / "tests" / "golden"
PHOTOS = REPO / "tests" / "data" / "photos"
OUR_PYTHON = Path(os.environ.get("PVT_DEPLOY_PYTHON") or REPO / ".venv" / "bin" / "python")
"""pvt-deploy's venv, which runs our side: ``$PVT_DEPLOY_PYTHON``, else the repository's ``.venv``."""

SEED = 0
NUM_CLASSES = 10
SIZE = (64, 64)
# pvt_deploy's "pvt_v2_tiny", written out so the birder side does not depend on our package
TINY_CONFIG = {
    "depths": [1, 1, 1, 1],
    "embed_dims": [16, 32, 80, 128],
    "mlp_ratios": [2.0, 2.0, 2.0, 2.0],
    "linear": False,
    "drop_path_rate": 0.0,
}
PHOTO_NAMES = ("astronaut.png", "camera.png", "chelsea.png", "coffee.png", "logo.png", "rocket.jpg")
INFER_IMAGE_PHOTO = "chelsea.png"
STAGES = ("stage1", "stage2", "stage3", "stage4")


def perturb(net, seed: int) -> None:
    """Same recipe as tests/fixtures/checkpoints.make_tiny_model: non-zero biases and LayerNorms, a wider head,
    so outputs are far from uniform and a parity check means something."""
    import torch

    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in net.named_parameters():
            if name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
            elif param.ndim == 1:
                param.copy_(1.0 + torch.randn(param.shape, generator=generator) * 0.1)
        net.classifier.weight.copy_(torch.randn(net.classifier.weight.shape, generator=generator) * 0.3)


def fixed_inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED)
    return {
        "input": rng.standard_normal((2, 3, *SIZE)).astype(np.float32),
        "input_nonsquare": rng.standard_normal((1, 3, 96, 64)).astype(np.float32),
    }


def birder_outputs(net, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import torch

    out: dict[str, np.ndarray] = {}
    with torch.inference_mode():
        x = torch.from_numpy(inputs["input"])
        out["logits"] = net(x).numpy()
        out["embedding"] = net.embedding(x).numpy()
        for name, value in net.detection_features(x).items():
            out[name] = value.numpy()
        out["logits_nonsquare"] = net(torch.from_numpy(inputs["input_nonsquare"])).numpy()
    return out


BIRDER_NETWORKS = (
    "pvt_v2_b0", "pvt_v2_b0_li", "pvt_v2_b1", "pvt_v2_b1_li", "pvt_v2_b2", "pvt_v2_b2_li",
    "pvt_v2_b3", "pvt_v2_b3_li", "pvt_v2_b4", "pvt_v2_b5",
)  # fmt: skip


def layout_digest(state: dict) -> dict:
    """A compact fingerprint of a state dict's keys, order and shapes (tests rebuild it from our model)."""
    import hashlib

    lines = "\n".join(f"{key}:{list(value.shape)}" for key, value in state.items())
    return {
        "num_keys": len(state),
        "num_params": int(sum(value.numel() for value in state.values())),
        "sha256": hashlib.sha256(lines.encode()).hexdigest(),
    }


def max_abs(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, float]:
    return {key: float(np.abs(a[key] - b[key]).max()) for key in a}


def stage_ours(workdir: Path) -> None:
    """Runs in OUR venv: write a checkpoint (.pt + .safetensors) with save_checkpoint plus our outputs."""
    import torch

    sys.path.insert(0, str(REPO))
    from pvt_deploy.model.checkpoint import save_safetensors
    from tests.fixtures.checkpoints import (
        BIRDER_RGB_STATS,
        make_tiny_model,
        tiny_class_to_idx,
        write_tiny_checkpoint,
    )

    torch.set_num_threads(1)
    write_tiny_checkpoint(workdir / "ours.pt", seed=7)
    model = make_tiny_model(seed=7)
    save_safetensors(workdir / "ours.safetensors", model, class_to_idx=tiny_class_to_idx(), rgb_stats=BIRDER_RGB_STATS)
    inputs = dict(np.load(workdir / "inputs.npz"))
    with torch.inference_mode():
        x = torch.from_numpy(inputs["input"])
        out = {"logits": model(x).numpy(), "embedding": model.embedding(x).numpy()}
        out.update({k: v.numpy() for k, v in model.detection_features(x).items()})
        out["logits_nonsquare"] = model(torch.from_numpy(inputs["input_nonsquare"])).numpy()
    np.savez(workdir / "ours_outputs.npz", **out)


def stage_birder(workdir: Path) -> None:
    import birder
    import PIL
    import torch
    import torchvision
    from birder.common import fs_ops
    from birder.conf import settings
    from birder.data.transforms.classification import get_rgb_stats, inference_preset
    from birder.inference.classification import infer_image
    from birder.model_registry import registry
    from birder.net.base import get_signature
    from PIL import Image

    torch.set_num_threads(1)
    GOLDEN.mkdir(parents=True, exist_ok=True)
    rgb_stats = get_rgb_stats("birder")
    class_to_idx = {f"class_{i}": i for i in range(NUM_CLASSES)}

    # 1. A birder-built, birder-saved checkpoint
    torch.manual_seed(SEED)
    net = registry.net_factory("pvt_v2_b0", NUM_CLASSES, 3, config=dict(TINY_CONFIG), size=SIZE)
    perturb(net, SEED)
    net.eval()
    settings.MODELS_DIR = workdir
    signature = get_signature((1, 3, *SIZE), NUM_CLASSES)
    fs_ops.checkpoint_model(
        "pvt_v2_tiny", 0, net, signature, class_to_idx, rgb_stats, None, None, None, None,
        external_config=dict(TINY_CONFIG),
    )  # fmt: skip
    shutil.copyfile(fs_ops.model_path("pvt_v2_tiny", epoch=0), GOLDEN / "birder_pvt_v2_tiny.pt")

    # 2. Outputs for fixed inputs, from the model birder loads back (what a user of the file would get)
    loaded, info = fs_ops.load_model(
        torch.device("cpu"), "pvt_v2_b0", path=GOLDEN / "birder_pvt_v2_tiny.pt", inference=True
    )
    inputs = fixed_inputs()
    outputs = birder_outputs(loaded, inputs)
    np.savez(GOLDEN / "birder_pvt_v2_tiny_outputs.npz", **inputs, **outputs)
    np.savez(workdir / "inputs.npz", **inputs)

    # 3. birder's preprocessing of real photos (its PIL loader: Image.open(...).convert("RGB"))
    cases = [(name, SIZE, 1.0) for name in PHOTO_NAMES]
    cases += [("chelsea.png", (96, 128), 1.0), ("coffee.png", (64, 96), 0.875), ("rocket.jpg", (384, 384), 1.0)]
    preprocess_arrays: dict[str, np.ndarray] = {}
    preprocess_cases = []
    for index, (name, size, center_crop) in enumerate(cases):
        transform = inference_preset(size, rgb_stats, center_crop)
        with open(PHOTOS / name, "rb") as handle:
            tensor = transform(Image.open(handle).convert("RGB"))
        key = f"case{index}"
        preprocess_arrays[key] = tensor.numpy()
        preprocess_cases.append({"key": key, "photo": name, "size": list(size), "center_crop": center_crop})
    np.savez_compressed(GOLDEN / "birder_preprocess.npz", **preprocess_arrays)

    # 4. birder's own single-image inference path (infer_image opens the path with PIL, no mode conversion)
    transform = inference_preset(SIZE, info.rgb_stats, 1.0)
    probabilities, embedding = infer_image(loaded, str(PHOTOS / INFER_IMAGE_PHOTO), transform, return_embedding=True)
    np.savez(GOLDEN / "birder_infer_image.npz", probabilities=probabilities, embedding=embedding)
    infer_image_modes = {}
    for name in ("camera.png", "logo.png"):
        try:
            infer_image(loaded, str(PHOTOS / name), transform)
            infer_image_modes[name] = "ok"
        except Exception as exc:  # record birder's behaviour on non-RGB files, whatever it is
            infer_image_modes[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"

    # 5. OUR checkpoint in birder: written by save_checkpoint in our venv, loaded by birder's loaders
    subprocess.run([str(OUR_PYTHON), __file__, "--stage", "ours", "--workdir", str(workdir)], check=True)
    ours_outputs = dict(np.load(workdir / "ours_outputs.npz"))
    via_load_model, _ = fs_ops.load_model(torch.device("cpu"), "pvt_v2_b0", path=workdir / "ours.pt", inference=True)
    via_safetensors, st_info = fs_ops.load_model(
        torch.device("cpu"), "pvt_v2_b0", path=workdir / "ours.safetensors", inference=True, st=True
    )
    via_load_checkpoint = _birder_load_checkpoint(fs_ops, torch, workdir)
    raw = torch.load(workdir / "ours.pt", weights_only=True)
    report = {
        "our_checkpoint_keys": sorted(raw),
        "birder_loaders": {
            "fs_ops.load_model(.pt)": max_abs(ours_outputs, birder_outputs(via_load_model.eval(), inputs)),
            "fs_ops.load_model(.safetensors, st=True)": max_abs(
                ours_outputs, birder_outputs(via_safetensors.eval(), inputs)
            ),
            "fs_ops.load_checkpoint(.pt)": max_abs(ours_outputs, birder_outputs(via_load_checkpoint.eval(), inputs)),
        },
        "safetensors_custom_config": st_info.custom_config,
        "note": "max abs difference between our model's outputs and birder's on the same inputs; 0.0 means identical",
    }
    (GOLDEN / "our_checkpoint_in_birder.json").write_text(json.dumps(report, indent=2) + "\n")

    # 6. Key-for-key layout of every birder PVT v2 size (550 classes, the published head size)
    layouts = {}
    for network in BIRDER_NETWORKS:
        with torch.device("meta"):
            layouts[network] = layout_digest(registry.net_factory(network, 550, 3, size=(384, 384)).state_dict())
    (GOLDEN / "birder_state_dict_layouts.json").write_text(json.dumps(layouts, indent=2) + "\n")

    manifest = {
        "made_by": "dev/make_goldens.py with birder 0.8.4 in its own venv",
        "versions": {
            "birder": birder.__version__,
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "pillow": PIL.__version__,
            "numpy": np.__version__,
        },
        "checkpoint": {
            "file": "birder_pvt_v2_tiny.pt",
            "birder_network": "pvt_v2_b0",
            "config": TINY_CONFIG,
            "num_classes": NUM_CLASSES,
            "size": list(SIZE),
            "seed": SEED,
            "rgb_stats": {k: list(v) for k, v in rgb_stats.items()},
        },
        "outputs": {"file": "birder_pvt_v2_tiny_outputs.npz", "keys": sorted({**inputs, **outputs})},
        "preprocess": {
            "file": "birder_preprocess.npz",
            "loader": "PIL Image.open(f).convert('RGB')",
            "cases": preprocess_cases,
        },  # fmt: skip
        "infer_image": {
            "file": "birder_infer_image.npz",
            "photo": INFER_IMAGE_PHOTO,
            "size": list(SIZE),
            "center_crop": 1.0,
            "call": "infer_image(net, path, inference_preset(size, rgb_stats, 1.0), return_embedding=True)",
            "non_rgb_files": infer_image_modes,
        },
    }
    (GOLDEN / "goldens.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(json.dumps(infer_image_modes, indent=2))


def _birder_load_checkpoint(fs_ops, torch, workdir: Path):
    """birder's training-side loader: ``load_checkpoint(device, network, config=..., epoch=...)`` reads
    ``MODELS_DIR/<network>_<epoch>.pt``; it ignores the file's config, so pass it like birder's train scripts do."""
    target = workdir / "pvt_v2_b0_1.pt"
    shutil.copyfile(workdir / "ours.pt", target)
    states = fs_ops.load_checkpoint(torch.device("cpu"), "pvt_v2_b0", config=dict(TINY_CONFIG), epoch=1)
    return states.net


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=("birder", "ours"), default="birder")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    if args.stage == "ours":
        stage_ours(args.workdir)
        return
    with tempfile.TemporaryDirectory(prefix="pvt-goldens-") as tmp:
        stage_birder(Path(tmp))


if __name__ == "__main__":
    main()
