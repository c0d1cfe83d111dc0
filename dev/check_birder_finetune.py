"""Show that birder 0.8.4 loads a checkpoint made by ``pvt-deploy train finetune`` and computes our outputs.

Run with birder's venv (not in CI; needs /work/birder-venv):

    /work/birder-venv/bin/python dev/check_birder_finetune.py [--remake]

1. If tests/golden/train_finetune_tiny.pt is missing (or --remake), make it with *our* venv and CLI: a few
   MMCR steps on synthetic 32px images, then a short full fine-tune on two class folders.
2. Load it with birder's ``fs_ops.load_checkpoint`` (the training-resume loader) and ``fs_ops.load_model``
   (the inference loader), run logits and embedding on fixed inputs, and with our ``load_checkpoint`` (via our
   venv) on the same inputs.
3. Write tests/golden/birder_loads_finetune.json: birder's outputs, ours, and their max abs differences. CI
   (tests/test_train_birder_golden.py) checks our side still reproduces birder's recorded numbers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUR_PYTHON = REPO / ".venv" / "bin" / "python"
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
    }
    RESULT.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: record[k] for k in ("checkpoint_sha256", "birder_version", "max_abs_diff_ours_vs_birder")}))
    worst = max(diffs.values())
    if worst > 1e-5:
        sys.exit(f"birder's outputs differ from ours by {worst:.3g}")


if __name__ == "__main__":
    main()
