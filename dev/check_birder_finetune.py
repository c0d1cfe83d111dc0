"""Show that birder 0.8.4 loads a checkpoint made by ``pvt-deploy train finetune`` and computes our outputs.

Run with the python of a venv holding birder 0.8.4 (``$BIRDER_PYTHON``; not in CI):

    $BIRDER_PYTHON dev/check_birder_finetune.py [--remake]

1. If tests/golden/train_finetune_tiny.pt is missing (or --remake), make it with *our* venv and CLI: a few
   MMCR steps on synthetic 32px images, then a short full fine-tune on two class folders.
2. Load it with birder's ``fs_ops.load_checkpoint`` (the training-resume loader) and ``fs_ops.load_model``
   (the inference loader), run logits and embedding on fixed inputs, and with our ``load_checkpoint`` (via our
   venv) on the same inputs.
3. Also make a fresh `train mmcr` run and load its three files in birder under birder's names: the backbone with
   ``load_checkpoint`` (tag "mmcr"), the whole MMCR net with birder's ``MMCR`` class and
   ``load_simple_checkpoint`` (which also reads our training-states file), comparing backbone embeddings and
   encoder / momentum-encoder projections (eval mode) with ours.
4. Write tests/golden/birder_loads_finetune.json: birder's outputs, ours, and their max abs differences. CI
   (tests/test_train_birder_golden.py) checks our side still reproduces birder's recorded numbers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUR_PYTHON = Path(os.environ.get("PVT_DEPLOY_PYTHON") or REPO / ".venv" / "bin" / "python")
"""pvt-deploy's venv, which runs our side: ``$PVT_DEPLOY_PYTHON``, else the repository's ``.venv``."""
GOLDEN_DIR = REPO / "tests" / "golden"
CHECKPOINT = GOLDEN_DIR / "train_finetune_tiny.pt"
RESULT = GOLDEN_DIR / "birder_loads_finetune.json"
INPUT_SEED = 1234
INPUT_SHAPE = (3, 3, 32, 32)

OURS_SNIPPET = """
import json, sys, torch
from pvt_deploy.model.checkpoint import load_checkpoint
loaded = load_checkpoint(sys.argv[1])
x = torch.randn(*json.loads(sys.argv[2]), generator=torch.Generator().manual_seed(int(sys.argv[3])))
with torch.no_grad():
    out = {"logits": loaded.model(x).tolist(), "embedding": loaded.model.embedding(x).tolist()}
print(json.dumps({"network": loaded.network, "outputs": out}))
"""


def make_images(root: Path) -> None:
    from PIL import Image, ImageDraw

    rng = random.Random(0)
    for name in ("discs", "stripes"):
        (root / name).mkdir(parents=True)
        for i in range(16):
            image = Image.new("RGB", (40, 40), tuple(rng.randrange(256) for _ in range(3)))
            draw = ImageDraw.Draw(image)
            colour = tuple(rng.randrange(256) for _ in range(3))
            if name == "stripes":
                for y in range(rng.randrange(4), 40, 8):
                    draw.rectangle([0, y, 39, y + 3], fill=colour)
            else:
                x, y = rng.randrange(2, 20), rng.randrange(2, 20)
                draw.ellipse([x, y, x + 13, y + 13], fill=colour)
            image.save(root / name / f"{i:03d}.png")


def make_checkpoint() -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_images(root / "data")
        common = ["--batch-size", "8", "--workers", "0", "--threads", "1", "--no-progress"]
        commands = [
            ["train", "mmcr", str(root / "data"), "--network", "pvt_v2_tiny", "--size", "32",
             "--projector-dims", "64,64,32", "--steps", "4", "--out", str(root / "mmcr"), *common],
            ["train", "finetune", str(root / "data"), "--init", str(root / "mmcr" / "pvt_v2_tiny_mmcr_4.pt"),
             "--full", "--steps", "4", "--lr", "1e-3", "--out", str(root / "ft"), *common],
        ]  # fmt: skip
        for command in commands:
            subprocess.run([str(OUR_PYTHON), "-m", "pvt_deploy", *command], check=True, cwd=REPO)
        GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / "ft" / "pvt_v2_tiny_finetune_4.pt", CHECKPOINT)
    return [
        "pvt-deploy " + " ".join(c if not c.startswith(tmp) else c.replace(tmp, "$TMP") for c in command)
        for command in commands
    ]


def birder_outputs() -> dict:
    import torch
    from birder.common import fs_ops
    from birder.conf import settings

    payload = torch.load(CHECKPOINT, map_location="cpu", weights_only=True)
    x = torch.randn(*INPUT_SHAPE, generator=torch.Generator().manual_seed(INPUT_SEED))
    results = {}
    device = torch.device("cpu")
    # load_model: the inference loader, reads the checkpoint's own config
    net, info = fs_ops.load_model(device, "pvt_v2_b0", path=CHECKPOINT, inference=True)
    with torch.no_grad():
        results["load_model"] = {"logits": net(x).tolist(), "embedding": net.embedding(x).tolist()}
    results["load_model_class_to_idx"] = info.class_to_idx
    # load_checkpoint: the training-resume loader, finds <network>_<tag>_<epoch>.pt under MODELS_DIR and takes
    # the config as an argument, as birder's train.py does with --model-config
    with tempfile.TemporaryDirectory() as tmp:
        settings.MODELS_DIR = Path(tmp)
        shutil.copyfile(CHECKPOINT, Path(tmp) / "pvt_v2_b0_finetune_4.pt")
        states = fs_ops.load_checkpoint(device, "pvt_v2_b0", config=payload["config"], tag="finetune", epoch=4)
    states.net.eval()
    with torch.no_grad():
        results["load_checkpoint"] = {"logits": states.net(x).tolist(), "embedding": states.net.embedding(x).tolist()}
    results["load_checkpoint_class_to_idx"] = states.class_to_idx
    return results


OURS_MMCR_SNIPPET = """
import json, sys, torch
from pvt_deploy.model.checkpoint import load_checkpoint
from pvt_deploy.train.pretrain import MMCRConfig, build_mmcr
run, x_shape, seed, dims = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
x = torch.randn(*x_shape, generator=torch.Generator().manual_seed(seed))
backbone = load_checkpoint(f"{run}/pvt_v2_tiny_mmcr_4.pt").model
net = build_mmcr(MMCRConfig(network="pvt_v2_tiny", size=(32, 32), projector_dims=tuple(dims)), seed=0)
net.load_state_dict(torch.load(f"{run}/mmcr_pvt_v2_tiny_4.pt", weights_only=True)["state"], strict=True)
net.eval()
with torch.no_grad():
    out = {"backbone_embedding": backbone.embedding(x).tolist(), "encoder": net.encoder(x).tolist(),
           "momentum_encoder": net.momentum_encoder(x).tolist()}
print(json.dumps(out))
"""
PROJECTOR_DIMS = [64, 64, 32]


def check_mmcr_files() -> dict:
    """birder loads the three files `train mmcr` writes, under birder's own names, with its own loaders."""
    import torch
    from birder.common import fs_ops
    from birder.conf import settings
    from birder.model_registry import registry
    from birder.net.ssl.mmcr import MMCR

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_images(root / "data")
        command = ["train", "mmcr", str(root / "data"), "--network", "pvt_v2_tiny", "--size", "32",
                   "--projector-dims", ",".join(map(str, PROJECTOR_DIMS)), "--steps", "4", "--out", str(root / "run"),
                   "--batch-size", "8", "--workers", "0", "--threads", "1", "--no-progress"]  # fmt: skip
        subprocess.run([str(OUR_PYTHON), "-m", "pvt_deploy", *command], check=True, cwd=REPO)
        ours_run = subprocess.run(
            [str(OUR_PYTHON), "-c", OURS_MMCR_SNIPPET, str(root / "run"), json.dumps(list(INPUT_SHAPE)),
             str(INPUT_SEED), json.dumps(PROJECTOR_DIMS)],
            check=True, capture_output=True, text=True, cwd=REPO,
        )  # fmt: skip
        ours = json.loads(ours_run.stdout.strip().splitlines()[-1])
        models = root / "models"
        models.mkdir()
        # birder's names for network pvt_v2_b0 (our pvt_v2_tiny is pvt_v2_b0 + the stored config)
        for ours_name, birder_name in (
            ("pvt_v2_tiny_mmcr_4.pt", "pvt_v2_b0_mmcr_4.pt"),
            ("mmcr_pvt_v2_tiny_4.pt", "mmcr_pvt_v2_b0_4.pt"),
            ("mmcr_pvt_v2_tiny_4_states.pt", "mmcr_pvt_v2_b0_4_states.pt"),
        ):
            shutil.copyfile(root / "run" / ours_name, models / birder_name)
        settings.MODELS_DIR = models
        device = torch.device("cpu")
        config = torch.load(models / "pvt_v2_b0_mmcr_4.pt", weights_only=True)["config"]
        x = torch.randn(*INPUT_SHAPE, generator=torch.Generator().manual_seed(INPUT_SEED))
        # the backbone, as birder's train.py --network pvt_v2_b0 --tag mmcr --resume-epoch 4 loads it
        backbone_states = fs_ops.load_checkpoint(device, "pvt_v2_b0", config=config, tag="mmcr", epoch=4)
        backbone_states.net.eval()
        # the whole net plus its training states, as birder's train_mmcr.py --resume-epoch 4 loads them
        backbone = registry.net_factory("pvt_v2_b0", 0, 3, config=config, size=(32, 32))
        net = MMCR(backbone, config={"projector_dims": PROJECTOR_DIMS})
        simple = fs_ops.load_simple_checkpoint(device, net, "mmcr_pvt_v2_b0", epoch=4, strict=True)
        net.eval()
        with torch.no_grad():
            theirs = {
                "backbone_embedding": backbone_states.net.embedding(x).tolist(),
                "encoder": net.encoder(x).tolist(),
                "momentum_encoder": net.momentum_encoder(x).tolist(),
            }
        return {
            "made_by": "pvt-deploy " + " ".join(c.replace(tmp, "$TMP") for c in command),
            "birder_loaders": {
                "pvt_v2_b0_mmcr_4.pt": "fs_ops.load_checkpoint(network='pvt_v2_b0', tag='mmcr', epoch=4, config=...)",
                "mmcr_pvt_v2_b0_4.pt + _states.pt": "birder MMCR(...) + fs_ops.load_simple_checkpoint(strict=True)",
            },
            "training_states_read_by_birder": simple.training_states.optimizer_state is not None,
            "max_abs_diff_ours_vs_birder": {k: max_abs_diff(theirs[k], ours[k]) for k in theirs},
        }


def max_abs_diff(a: list, b: list) -> float:
    import torch

    return float((torch.tensor(a) - torch.tensor(b)).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--remake", action="store_true", help="train a new checkpoint even if one exists")
    args = parser.parse_args()
    import birder

    made_by = None
    if args.remake or not CHECKPOINT.is_file():
        made_by = make_checkpoint()
    elif RESULT.is_file():
        made_by = json.loads(RESULT.read_text()).get("made_by")
    ours_run = subprocess.run(
        [str(OUR_PYTHON), "-c", OURS_SNIPPET, str(CHECKPOINT), json.dumps(list(INPUT_SHAPE)), str(INPUT_SEED)],
        check=True,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    ours = json.loads(ours_run.stdout.strip().splitlines()[-1])
    theirs = birder_outputs()
    diffs = {
        f"{loader}.{output}": max_abs_diff(theirs[loader][output], ours["outputs"][output])
        for loader in ("load_model", "load_checkpoint")
        for output in ("logits", "embedding")
    }
    record = {
        "checkpoint": str(CHECKPOINT.relative_to(REPO)),
        "checkpoint_sha256": hashlib.sha256(CHECKPOINT.read_bytes()).hexdigest(),
        "made_by": made_by,
        "birder_version": birder.__version__,
        "birder_network": "pvt_v2_b0 + the checkpoint's config",
        "our_network": ours["network"],
        "inputs": {"shape": list(INPUT_SHAPE), "seed": INPUT_SEED, "rule": "torch.randn with a Generator seeded so"},
        "birder_outputs": {"load_model": theirs["load_model"], "load_checkpoint": theirs["load_checkpoint"]},
        "birder_class_to_idx": theirs["load_model_class_to_idx"],
        "class_to_idx_agree": theirs["load_model_class_to_idx"] == theirs["load_checkpoint_class_to_idx"],
        "max_abs_diff_ours_vs_birder": diffs,
        "mmcr_checkpoints": check_mmcr_files(),
    }
    RESULT.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: record[k] for k in ("checkpoint_sha256", "birder_version", "max_abs_diff_ours_vs_birder")}))
    worst = max([*diffs.values(), *record["mmcr_checkpoints"]["max_abs_diff_ours_vs_birder"].values()])
    print(json.dumps(record["mmcr_checkpoints"]))
    if worst > 1e-5:
        sys.exit(f"birder's outputs differ from ours by {worst:.3g}")


if __name__ == "__main__":
    main()
