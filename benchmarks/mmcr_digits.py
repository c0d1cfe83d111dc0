"""Does a short CPU MMCR pretraining help? Linear-probe accuracy on scikit-learn's digits, pretrained vs random init.

Data: sklearn.datasets.load_digits (1,797 real 8x8 handwritten digits, 0-16 grey levels), upsampled to 32x32 RGB
PNGs, split once (stratified, random_state=0) into train and test. MMCR sees the *train* images without labels.
Probe: the backbone's frozen embedding of each whole image -> standardised -> logistic regression on train,
accuracy on test. The random-init baseline is the very same network and seed before any training step.

    .venv/bin/python benchmarks/mmcr_digits.py   # writes benchmarks/results/mmcr_digits.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pvt_deploy.model.checkpoint import load_checkpoint
from pvt_deploy.train.augment import BIRDER_RGB_STATS, eval_batch
from pvt_deploy.train.pretrain import MMCRConfig, build_mmcr

REPO = Path(__file__).resolve().parent.parent
RESULT = REPO / "benchmarks" / "results" / "mmcr_digits.json"


def write_digits(root: Path, size: int) -> tuple[list[Path], np.ndarray, list[Path], np.ndarray]:
    digits = load_digits()
    images = (digits.images / 16.0 * 255.0).round().astype(np.uint8)
    index = np.arange(len(images))
    train_idx, test_idx = train_test_split(index, test_size=0.3, random_state=0, stratify=digits.target)
    paths = {}
    for split, chosen in (("train", train_idx), ("test", test_idx)):
        folder = root / split
        folder.mkdir(parents=True)
        for i in chosen:
            path = folder / f"{i:04d}.png"
            Image.fromarray(images[i]).resize((size, size), Image.BICUBIC).convert("RGB").save(path)
            paths[i] = path
    return (
        [paths[i] for i in train_idx],
        digits.target[train_idx],
        [paths[i] for i in test_idx],
        digits.target[test_idx],
    )


@torch.no_grad()
def embed(model: torch.nn.Module, paths: list[Path], size: int) -> np.ndarray:
    model.eval()
    batch = eval_batch(paths, (size, size), BIRDER_RGB_STATS)
    return torch.cat([model.embedding(chunk) for chunk in batch.split(256)]).numpy()


def probe(model: torch.nn.Module, train: tuple, test: tuple, size: int, shots: int, draws: int) -> dict[str, float]:
    """Full linear probe, plus a low-label one (``shots`` train images per class, ``draws`` fixed draws)."""
    train_x, test_x = embed(model, train[0], size), embed(model, test[0], size)

    def fit_score(rows: np.ndarray) -> float:
        classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=1.0))
        classifier.fit(train_x[rows], train[1][rows])
        return float(classifier.score(test_x, test[1]))

    few = []
    for draw in range(draws):
        rng = np.random.default_rng(draw)
        rows = np.concatenate([rng.choice(np.flatnonzero(train[1] == c), shots, replace=False) for c in range(10)])
        few.append(fit_score(rows))
    return {"full": fit_score(np.arange(len(train[1]))), "few_shot_mean": float(np.mean(few)),
            "few_shot_std": float(np.std(few))}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--projector-dims", default="512,512,128")
    parser.add_argument("--aug-level", type=int, default=3)
    parser.add_argument("--min-scale", type=float, default=0.4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shots", type=int, default=10, help="labelled train images per class, low-label probe")
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--flip", action="store_true", help="random flips (digits are not mirror-symmetric)")
    parser.add_argument("--eval-every", type=int, default=100, help="also probe the checkpoints of these steps")
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="mmcr_digits_") as tmp:
        root = Path(tmp)
        train_paths, train_y, test_paths, test_y = write_digits(root / "digits", args.size)
        command = [
            sys.executable, "-m", "pvt_deploy", "train", "mmcr", str(root / "digits" / "train"),
            "--network", "pvt_v2_tiny", "--size", str(args.size), "--projector-dims", args.projector_dims,
            "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--lr", str(args.lr),
            "--warmup-steps", str(max(1, args.steps // 10)), "--aug-level", str(args.aug_level),
            "--min-scale", str(args.min_scale), "--seed", str(args.seed), "--workers", str(args.workers),
            "--threads", str(args.threads), "--out", str(root / "run"), "--no-progress", "--log-every", "10",
            "--checkpoint-every", str(args.eval_every), "--flip" if args.flip else "--no-flip",
        ]  # fmt: skip
        start = time.perf_counter()
        subprocess.run(command, check=True, cwd=REPO)
        pretrain_seconds = time.perf_counter() - start

        dims = tuple(int(d) for d in args.projector_dims.split(","))
        config = MMCRConfig(network="pvt_v2_tiny", size=(args.size, args.size), projector_dims=dims)
        random_backbone = build_mmcr(config, args.seed).backbone  # the exact weights step 0 started from
        train, test = (train_paths, train_y), (test_paths, test_y)
        curve = {0: probe(random_backbone, train, test, args.size, args.shots, args.draws)}
        for step in [*range(args.eval_every, args.steps, args.eval_every), args.steps]:
            backbone = load_checkpoint(root / "run" / f"pvt_v2_tiny_mmcr_{step}.pt").model
            curve[step] = probe(backbone, train, test, args.size, args.shots, args.draws)
            print(f"step {step}: linear-probe accuracy {curve[step]}", flush=True)
        random_accuracy = curve[0]["full"]
        pretrained_accuracy = curve[args.steps]["full"]
        losses = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]

    shown = [Path(sys.executable).relative_to(REPO) if Path(sys.executable).is_relative_to(REPO) else "python"]
    result = {
        "task": "linear probe (standardised logistic regression) on frozen pvt_v2_tiny embeddings, sklearn digits",
        "data": {"train_images": len(train_paths), "test_images": len(test_paths), "size": args.size,
                 "split": "train_test_split(test_size=0.3, stratify=target, random_state=0)"},
        "random_init_accuracy": round(random_accuracy, 4),
        "mmcr_pretrained_accuracy": round(pretrained_accuracy, 4),
        "improvement": round(pretrained_accuracy - random_accuracy, 4),
        "few_shot": {
            "protocol": f"{args.shots} labelled train images per class, {args.draws} fixed draws, full test set",
            "random_init_mean": round(curve[0]["few_shot_mean"], 4),
            "mmcr_pretrained_mean": round(curve[args.steps]["few_shot_mean"], 4),
            "random_init_std": round(curve[0]["few_shot_std"], 4),
            "mmcr_pretrained_std": round(curve[args.steps]["few_shot_std"], 4),
        },
        "accuracy_by_step": {str(step): {k: round(v, 4) for k, v in acc.items()} for step, acc in curve.items()},
        "pretraining": {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                        "projector_dims": list(dims), "aug_level": args.aug_level, "min_scale": args.min_scale,
                        "flip": args.flip,
                        "seconds": round(pretrain_seconds, 1), "threads": args.threads,
                        "first_loss": losses[0]["loss"], "last_loss": losses[-1]["loss"]},
        "benchmark_command": " ".join([str(shown[0]), "benchmarks/mmcr_digits.py", *sys.argv[1:]]),
        "pretrain_command": shlex.join(["pvt-deploy", *command[3:]]).replace(str(root), "$TMP"),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "cpu_threads": args.threads},
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
