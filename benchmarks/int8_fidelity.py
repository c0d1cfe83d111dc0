"""Does int8 keep the class? Logit error and top-1 agreement by fp32 margin, fp32 vs int8 variants, on real photos.

Embedding cosine alone cannot see a class flip: 0.9997 leaves room for a logit to move by more than a small margin.
This measures what a user who classifies sees, on the repo photos and augmentations of them (crops, flips,
brightness, contrast, a small rotation), through the exported ``embed`` graph run row by row as the runtime runs it:

- heads whose fp32 top-1 margins span small to large: the export's own classifier (random weights: near-ties);
  random 550-class heads scaled so the logits' spread across classes (std) is 1, 2, 4 or 8 logits, i.e. from
  near-ties to the spread of a confident trained classifier; logistic-regression heads fit (cross-entropy) on the
  fp32 embeddings, one class per photo, regularisation from strong (small margins) to weak;
- per variant: embedding cosine and relative error, |delta logit| percentiles and top-1 agreement by margin bucket,
  the largest fp32 margin at which a top-1 flipped;
- ``--sensitivity``: quantize one (stage, role) group alone and measure the embedding error it causes: what moves
  the logits;
- ``--speed-rounds N``: interleaved A/B (one image per call, order rotating) of every variant against the first.

Every figure carries the load average; figures taken at load > 1 are marked ``"loaded": true``.

    python benchmarks/int8_fidelity.py /tmp/b2 --variant shipped=default \\
        --variant before=attention_matmuls+patch_embed+classifier --variant static=static:default \\
        --speed-rounds 8 --out benchmarks/results/int8_fidelity-b2-384-amd-epyc-avx2.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from PIL import Image, ImageEnhance, ImageOps

from pvt_deploy.bench.machine import cpu_summary, load_average
from pvt_deploy.export.parity import (
    KEEP_CLASS_MARGIN,
    cosine_per_sample,
    flip_margin_max,
    margin_buckets,
    top1_margins,
)
from pvt_deploy.export.precision import INT8_FLOAT_GROUPS, float_nodes_for_int8, int8_node_roles, make_variant
from pvt_deploy.preprocess import is_image_file
from pvt_deploy.runtime import Runtime
from pvt_deploy.runtime.sessions import create_session

DEFAULT_PHOTOS = (Path("tests/data/photos"), Path("../shared/photos"))
RANDOM_HEAD_LOGIT_STDS = (1.0, 2.0, 4.0, 8.0)
FIT_HEAD_C = (0.003, 0.03, 0.3, 3.0)


def parse_variant(spec: str) -> tuple[str, str, list[str]]:
    """``NAME=[static:|dynamic:]GROUP+GROUP``; the group ``default`` stands for ``INT8_FLOAT_GROUPS``."""
    name, _, rest = spec.partition("=")
    method, _, groups_text = rest.rpartition(":")
    groups: list[str] = []
    for group in groups_text.split("+"):
        for item in INT8_FLOAT_GROUPS if group == "default" else [group] if group else []:
            if item not in groups:
                groups.append(item)
    return name, method or "dynamic", groups


def loaded(load: list[float] | None) -> bool:
    return load is not None and load[0] > 1.0


# ------------------------------------------------------------------------------------------------- inputs


def load_photos(folders: list[Path]) -> list[tuple[str, Image.Image]]:
    """Every image in ``folders``, the same bytes counted once."""
    seen: set[str] = set()
    photos = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in sorted(p for p in folder.iterdir() if is_image_file(p)):
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if digest not in seen:
                seen.add(digest)
                photos.append((path.name, Image.open(path).convert("RGB")))
    return photos


def augment(image: Image.Image, count: int) -> list[tuple[str, Image.Image]]:
    """The photo and up to ``count - 1`` deterministic variations of it."""
    width, height = image.size

    def crop(fraction: float, x: float, y: float) -> Image.Image:
        w, h = int(width * fraction), int(height * fraction)
        left, top = int((width - w) * x), int((height - h) * y)
        return image.crop((left, top, left + w, top + h))

    variations = [
        ("original", image),
        ("mirror", ImageOps.mirror(image)),
        ("crop80", crop(0.8, 0.5, 0.5)),
        ("crop85-tl", crop(0.85, 0.0, 0.0)),
        ("crop85-br", crop(0.85, 1.0, 1.0)),
        ("dark", ImageEnhance.Brightness(image).enhance(0.7)),
        ("bright", ImageEnhance.Brightness(image).enhance(1.3)),
        ("contrast", ImageEnhance.Contrast(image).enhance(1.4)),
        ("rotate8", image.rotate(8, resample=Image.BICUBIC)),
        ("mirror-crop80", ImageOps.mirror(crop(0.8, 0.5, 0.5))),
    ]
    return variations[:count]


# ------------------------------------------------------------------------------------------------- heads


def classifier_of(classify_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The export's own head (W: classes x D, b) read from the classify graph's float classifier Gemm."""
    from onnx import numpy_helper

    model = onnx.load(str(classify_path))
    inits = {init.name: init for init in model.graph.initializer}
    node = next(n for n in model.graph.node if n.op_type in ("Gemm", "MatMul") and "classifier" in n.name)
    weight = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
    trans_b = any(a.name == "transB" and a.i for a in node.attribute)
    weight = weight if trans_b else weight.T
    bias = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64) if len(node.input) > 2 else None
    return weight, bias if bias is not None else np.zeros(len(weight))


def make_heads(reference: np.ndarray, photo_of: np.ndarray, classify_path: Path | None) -> list[dict[str, Any]]:
    """Heads over the embedding, each ``{family, name, weight, bias}``; margins from near-ties to large."""
    heads = []
    if classify_path is not None and classify_path.exists():
        weight, bias = classifier_of(classify_path)
        heads.append({"family": "export-head", "name": "export's classifier", "weight": weight, "bias": bias})
    rng = np.random.default_rng(0)
    for index, spread in enumerate(RANDOM_HEAD_LOGIT_STDS):
        weight = rng.standard_normal((550, reference.shape[1]))
        scale = spread / np.median((reference @ weight.T).std(axis=1))
        heads.append(
            {
                "family": "random-550",
                "name": f"random 550-class head {index}, fp32 logits' std across classes {spread} (median)",
                "weight": weight * scale,
                "bias": np.zeros(550),
            }
        )
    from sklearn.linear_model import LogisticRegression

    for c in FIT_HEAD_C:
        fit = LogisticRegression(C=c, max_iter=5000).fit(reference, photo_of)
        heads.append(
            {
                "family": "fit-photos",
                "name": f"logistic regression on fp32 embeddings, one class per photo, C={c}",
                "weight": fit.coef_.astype(np.float64),
                "bias": fit.intercept_.astype(np.float64),
            }
        )
    return heads


def logits(embedding: np.ndarray, head: dict[str, Any]) -> np.ndarray:
    return embedding.astype(np.float64) @ head["weight"].T + head["bias"]


# ------------------------------------------------------------------------------------------------- measure


def embed_rows(session: Any, x: np.ndarray) -> np.ndarray:
    """One image per call: the runtime runs dynamic int8 row by row (its activation scale is per call)."""
    return np.concatenate([session.run(["embedding"], {"input": x[i : i + 1]})[0] for i in range(len(x))])


def relative_errors(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Per row: the norm of the embedding's change over the norm of the fp32 embedding (float64)."""
    a, b = reference.astype(np.float64), candidate.astype(np.float64)
    return np.linalg.norm(a - b, axis=1) / np.linalg.norm(a, axis=1)


def fidelity(reference: np.ndarray, candidate: np.ndarray, heads: list[dict[str, Any]]) -> dict[str, Any]:
    """Embedding error, then per head family: margin buckets pooled over its heads, flips, |delta logit|."""
    a, b = reference.astype(np.float64), candidate.astype(np.float64)
    cosine = cosine_per_sample(a, b)
    relative = relative_errors(a, b)
    out: dict[str, Any] = {
        "embedding": {
            "cosine_mean": float(cosine.mean()),
            "cosine_min": float(cosine.min()),
            "relative_error_median": float(np.median(relative)),
            "relative_error_max": float(relative.max()),
        },
        "families": {},
    }
    totals = {"samples": 0, "agree": 0, "flips_at_or_above_keep_margin": 0, "flip_margin_max": 0.0}
    for family in dict.fromkeys(h["family"] for h in heads):
        members = [h for h in heads if h["family"] == family]
        ref = np.concatenate([logits(a, h) for h in members])
        got = np.concatenate([logits(b, h) for h in members])
        margins = top1_margins(ref)
        same = ref.argmax(1) == got.argmax(1)
        delta = np.abs(ref - got)
        entry = {
            "heads": [h["name"] for h in members],
            "samples": len(ref),
            "top1_agreement": float(same.mean()),
            "flips": int((~same).sum()),
            "flip_margin_max": flip_margin_max(ref, got),
            "flips_at_or_above_keep_margin": int((~same & (margins >= KEEP_CLASS_MARGIN)).sum()),
            "fp32_margin_percentiles": {f"p{q}": float(np.percentile(margins, q)) for q in (5, 25, 50, 75, 95)},
            "delta_logit_percentiles": {f"p{q}": float(np.percentile(delta, q)) for q in (50, 90, 99)}
            | {"max": float(delta.max())},
            "by_margin": margin_buckets(ref, got),
            "per_head": [_head_summary(logits(a, h), logits(b, h), h["name"]) for h in members],
        }
        out["families"][family] = entry
        totals["samples"] += len(ref)
        totals["agree"] += int(same.sum())
        totals["flips_at_or_above_keep_margin"] += entry["flips_at_or_above_keep_margin"]
        totals["flip_margin_max"] = max(totals["flip_margin_max"], entry["flip_margin_max"])
    out["overall"] = {
        "samples": totals["samples"],
        "top1_agreement": totals["agree"] / max(1, totals["samples"]),
        "flips_at_or_above_keep_margin": totals["flips_at_or_above_keep_margin"],
        "flip_margin_max": totals["flip_margin_max"],
        "keeps_class": totals["flips_at_or_above_keep_margin"] == 0 and totals["agree"] >= 0.99 * totals["samples"],
    }
    return out


def _head_summary(ref: np.ndarray, got: np.ndarray, name: str) -> dict[str, Any]:
    same = ref.argmax(1) == got.argmax(1)
    margins = top1_margins(ref)
    return {
        "head": name,
        "fp32_margin_median": float(np.median(margins)),
        "top1_agreement": float(same.mean()),
        "flips_at_or_above_keep_margin": int((~same & (margins >= KEEP_CLASS_MARGIN)).sum()),
        "flip_margin_max": flip_margin_max(ref, got),
        "delta_logit_max": float(np.abs(ref - got).max()),
    }


def speed_ab(paths: dict[str, Path], x: np.ndarray, rounds: int, threads: int) -> dict[str, Any]:
    """Interleaved rounds, one call per variant per round on one image, order rotated each round; the first
    variant is the baseline. Ratio = baseline median / variant median; per-round ratios give the spread."""
    sessions = {name: create_session(path, threads=threads) for name, path in paths.items()}
    one = x[:1]
    for session in sessions.values():
        session.run(["embedding"], {"input": one})
    names = list(sessions)
    times: dict[str, list[float]] = {name: [] for name in names}
    loads = []
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            begin = time.perf_counter()
            sessions[name].run(["embedding"], {"input": one})
            times[name].append(time.perf_counter() - begin)
        loads.append(load_average())
    base = names[0]
    result: dict[str, Any] = {
        "baseline": base,
        "rounds": rounds,
        "threads": threads,
        "load_per_round": loads,
        "loaded": any(loaded(load) for load in loads),
    }
    for name in names:
        per_round = [b / t for b, t in zip(times[base], times[name], strict=True)]
        result[name] = {
            "median_ms": 1000 * statistics.median(times[name]),
            "min_ms": 1000 * min(times[name]),
            "x_baseline": statistics.median(times[base]) / statistics.median(times[name]),
            "per_round_ratio_min": min(per_round),
            "per_round_ratio_max": max(per_round),
        }
    return result


def sensitivity(fp32_path: Path, x: np.ndarray, reference: np.ndarray, threads: int, tmp: Path) -> dict[str, Any]:
    """Quantize one (stage, role) group alone (dynamic, as shipped) and measure the embedding error it causes.

    The export's own quantizer does it, with every other node's ``stage<N>/<role>`` group kept float."""
    model = onnx.load(str(fp32_path))
    roles = int8_node_roles(model)
    every_group = {f"stage{stage}/{role}" for stage, role in roles.values()}
    groups: dict[str, list[str]] = {}
    for name, (stage, role) in roles.items():
        if role in ("q", "kv", "proj", "fc1", "fc2"):
            groups.setdefault(f"stage{stage}/{role}", []).append(name)
    out = {}
    for group, nodes in sorted(groups.items()):
        path = tmp / "one-group.onnx"
        make_variant(fp32_path, "int8", path, int8_method="dynamic", float_groups=sorted(every_group - {group}))
        got = embed_rows(create_session(path, threads=threads), x)
        relative = relative_errors(reference, got)
        weights = sum(_weight_elements(model, n) for n in nodes)
        out[group] = {
            "nodes": len(nodes),
            "weight_elements": weights,
            "relative_error_median": float(np.median(relative)),
            "relative_error_max": float(relative.max()),
            "load": load_average(),
        }
        print(f"  {group}: relative embedding error median {out[group]['relative_error_median']:.5f}", flush=True)
    return out


def _weight_elements(model: onnx.ModelProto, node_name: str) -> int:
    inits = {init.name: init for init in model.graph.initializer}
    node = next(n for n in model.graph.node if n.name == node_name)
    return int(sum(np.prod(inits[i].dims) for i in node.input if i in inits))


# ------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path, help="an export with fp32 embed/classify graphs")
    parser.add_argument("--photos", type=Path, action="append", help="photo folders [tests/data/photos, shared]")
    parser.add_argument("--augmentations", type=int, default=8, help="variations per photo, the photo included")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="NAME=[static:]GROUP+GROUP: int8 (dynamic unless static:, calibrated on the unaugmented photos) keeping "
        "these groups float ('default': INT8_FLOAT_GROUPS); the first variant is the speed baseline",
    )
    parser.add_argument("--sensitivity", action="store_true", help="quantize each (stage, role) group alone")
    parser.add_argument("--sensitivity-images", type=int, default=12)
    parser.add_argument("--speed-rounds", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--save-embeddings", type=Path, help="npz of the fp32 and every variant's embeddings")
    args = parser.parse_args()

    started = load_average()
    runtime = Runtime(args.model_dir, device="cpu")
    photos = load_photos(args.photos or list(DEFAULT_PHOTOS))
    images, photo_of, tags = [], [], []
    for index, (name, photo) in enumerate(photos):
        for tag, image in augment(photo, args.augmentations):
            images.append(image)
            photo_of.append(index)
            tags.append(f"{name}:{tag}")
    x = runtime.preprocess(images)
    photo_of_array = np.array(photo_of)
    fp32_path = args.model_dir / "embed.onnx"
    print(f"{len(photos)} photos x {args.augmentations} = {len(x)} inputs; load {load_average()}", flush=True)
    reference = embed_rows(create_session(fp32_path, threads=args.threads), x)
    heads = make_heads(reference, photo_of_array, args.model_dir / "classify.onnx")
    result: dict[str, Any] = {
        "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_summary(),
        "model_dir": str(args.model_dir),
        "random_weights": bool(runtime.manifest.random_weights),
        "inputs": {"photos": [name for name, _ in photos], "augmentations": args.augmentations, "count": len(x)},
        "keep_class_margin": KEEP_CLASS_MARGIN,
        "heads": [{"family": h["family"], "name": h["name"]} for h in heads],
        "variants": {},
    }
    saved = {"fp32": reference, "photo_of": photo_of_array}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if args.sensitivity:
            print("sensitivity: one (stage, role) group quantized alone", flush=True)
            count = args.sensitivity_images
            step = max(1, len(x) // count)
            result["sensitivity"] = sensitivity(fp32_path, x[::step], reference[::step], args.threads, tmp)
        paths: dict[str, Path] = {}
        for spec in args.variant or ["shipped=default"]:
            name, method, groups = parse_variant(spec)
            path = tmp / f"{name}.onnx"
            calibration = [x[:: args.augmentations]] if method == "static" else None  # the photos, unaugmented
            description = make_variant(
                fp32_path, "int8", path, calibration_batches=calibration, int8_method=method, float_groups=groups
            )
            got = embed_rows(create_session(path, threads=args.threads), x)
            load = load_average()
            measured = fidelity(reference, got, heads)
            float_nodes = len(float_nodes_for_int8(onnx.load(str(fp32_path), load_external_data=False), groups))
            result["variants"][name] = {
                "method": method,
                "float_groups": groups,
                "float_nodes": float_nodes,
                "description": description,
                "load": load,
                "loaded": loaded(load),
                **measured,
            }
            overall = measured["overall"]
            print(
                f"{name}: cosine min {measured['embedding']['cosine_min']:.5f}, top-1 {overall['top1_agreement']:.4f}, "
                f"flips at margin >= {KEEP_CLASS_MARGIN}: {overall['flips_at_or_above_keep_margin']}, "
                f"largest flipped margin {overall['flip_margin_max']:.3f}; load {load}",
                flush=True,
            )
            paths[name] = path
            saved[name] = got
        if args.speed_rounds:
            result["speed"] = speed_ab(paths, x, args.speed_rounds, args.threads)
            for name in paths:
                speed = result["speed"][name]
                print(
                    f"{name}: {speed['median_ms']:.0f} ms, x{speed['x_baseline']:.3f} of {result['speed']['baseline']}"
                )
    if args.save_embeddings:
        np.savez(args.save_embeddings, **saved)
    result["load"] = {"start": started, "end": load_average()}
    result["loaded"] = loaded(started) or loaded(result["load"]["end"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
