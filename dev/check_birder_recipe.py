"""Show that ``train mmcr --recipe birder`` writes training states birder 0.8.4's own resume path accepts, and
record birder's recipe facts. NOT run by CI; CI checks our side against what this writes.

Run from the repository root with the python of a venv holding birder 0.8.4 (``$BIRDER_PYTHON``); our side runs
in ``$PVT_DEPLOY_PYTHON`` (default ``.venv/bin/python``)::

    python3 -m venv /work/birder-venv
    /work/birder-venv/bin/pip install torch==2.14.1 torchvision==0.29.1
    /work/birder-venv/bin/pip install --no-deps birder==0.8.4
    /work/birder-venv/bin/pip install webdataset tqdm scipy polars rich scikit-learn matplotlib torchinfo \\
        tensorboard 'torchmetrics~=1.9.0'
    PVT_DEPLOY_PYTHON=.venv/bin/python /work/birder-venv/bin/python dev/check_birder_recipe.py

1. Our venv trains ``pvt_v2_tiny`` for 3 steps (2 per epoch) with ``--recipe birder``, and once more with our
   default recipe, on the synthetic images of ``tests/test_train_data.make_image_folder``; then fine-tunes each
   run's backbone for 3 steps with the same recipe.
2. birder, under its own file names, loads the whole MMCR net with ``fs_ops.load_simple_checkpoint`` (as
   ``train_mmcr.py --resume-epoch 3`` does) and builds its optimizer and scheduler exactly as ``train_mmcr.train``
   does, from ``train_mmcr``'s own argument defaults (``--load-states``): ``optimizer_parameter_groups``,
   ``get_optimizer``, ``get_scheduler``; then ``optimizer.load_state_dict`` / ``scheduler.load_state_dict`` on our
   states, and one more SGD step with birder's loss. Our default recipe's states are loaded the same way and
   birder's refusal is recorded. The fine-tunes go through ``train.py``'s path the same way
   (``fs_ops.load_checkpoint`` with tag "finetune", its optimizer and scheduler, one cross-entropy step).
3. birder's augmentation facts: ``BirderAugment``'s op list at every level (canonicalised to the dicts of
   ``pvt_deploy.train.birder_augment.birder_ops``), the crop, flip and erasing settings, the two scripts'
   optimizer / schedule / augmentation defaults, and torchvision's output for each op on a fixed image.
4. Writes tests/golden/birder_recipe.json. ``tests/test_train_birder_recipe.py`` re-runs step 1 (without birder)
   and checks our states, recipe table and ops against it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
OUR_PYTHON = Path(os.environ.get("PVT_DEPLOY_PYTHON") or REPO / ".venv" / "bin" / "python")
"""pvt-deploy's venv, which runs our side: ``$PVT_DEPLOY_PYTHON``, else the repository's ``.venv``."""
RESULT = REPO / "tests" / "golden" / "birder_recipe.json"

EPOCH = 3
PROJECTOR_DIMS = [64, 64, 32]
COMMAND = [
    "train", "mmcr", "$DATA", "--network", "pvt_v2_tiny", "--size", "32",
    "--projector-dims", ",".join(map(str, PROJECTOR_DIMS)), "--steps", str(EPOCH), "--batch-size", "4",
    "--workers", "0", "--threads", "1", "--no-progress", "--out", "$OUT",
]  # fmt: skip
"""The run whose states birder loads: 8 images, batch 4, so 2 steps per epoch and the schedule steps once."""
FINETUNE_COMMAND = [
    "train", "finetune", "$DATA", "--init", f"$MMCR/pvt_v2_tiny_mmcr_{EPOCH}.pt", "--steps", str(EPOCH),
    "--batch-size", "4", "--workers", "0", "--threads", "1", "--no-progress", "--out", "$OUT",
]  # fmt: skip
"""A fine-tune of that run's backbone, with the same recipe; birder's ``train.py --resume-epoch`` loads it."""
IMAGES_PER_CLASS = 4

OUR_RUN = """
import json, subprocess, sys
from pathlib import Path
from tests.test_train_data import make_image_folder
root, per_class, commands = Path(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
make_image_folder(root / "data", per_class=per_class)
for recipe in ("birder", "pvt-deploy"):
    for kind, command in commands.items():
        out, mmcr = root / f"{recipe}-{kind}", root / f"{recipe}-mmcr"
        args = [a.replace("$DATA", str(root / "data")).replace("$OUT", str(out)).replace("$MMCR", str(mmcr))
                for a in command]
        subprocess.run([sys.executable, "-m", "pvt_deploy", *args, "--recipe", recipe], check=True)
"""


def tensor_facts(tensor: Any) -> dict[str, Any]:
    import torch

    data = tensor.detach().cpu().contiguous()
    return {
        "shape": list(data.shape),
        "sha256": hashlib.sha256(data.numpy().tobytes()).hexdigest(),
        "norm": float(torch.linalg.vector_norm(data.double())),
        "sum": float(data.double().sum()),
    }


def birder_optimizer(net: Any, args: Any) -> tuple[Any, Any]:
    """``train_mmcr.train``'s optimizer and scheduler construction, step for step."""
    from birder.common import training_utils

    lr = training_utils.scale_lr(args)
    parameters = training_utils.optimizer_parameter_groups(
        net,
        args.wd,
        base_lr=lr,
        norm_weight_decay=args.norm_wd,
        custom_keys_weight_decay=training_utils.get_wd_custom_keys(args),
        custom_layer_weight_decay=args.custom_layer_wd,
        layer_decay=args.layer_decay,
        layer_decay_min_scale=args.layer_decay_min_scale,
        layer_decay_no_opt_scale=args.layer_decay_no_opt_scale,
        bias_lr=args.bias_lr,
        custom_layer_lr_scale=args.custom_layer_lr_scale,
    )
    assert args.lr_scheduler_update == "epoch"
    optimizer = training_utils.get_optimizer(parameters, lr, args)
    scheduler = training_utils.get_scheduler(optimizer, 1, args)
    return optimizer, scheduler


def load_into_birder(run: Path, models: Path, kind: str) -> dict[str, Any]:
    """birder's ``--resume-epoch EPOCH --load-states`` path on the files of one of our runs: ``train_mmcr.py``'s
    for an MMCR run, ``train.py``'s for a fine-tune."""
    import torch
    from birder.common import fs_ops
    from birder.conf import settings
    from birder.model_registry import registry
    from birder.net.ssl.mmcr import MMCR, MMCRMomentumLoss
    from birder.scripts import train, train_mmcr

    ours, theirs = (
        ("mmcr_pvt_v2_tiny", "mmcr_pvt_v2_b0") if kind == "mmcr" else ("pvt_v2_tiny_finetune", "pvt_v2_b0_finetune")
    )
    if models.exists():
        shutil.rmtree(models)
    models.mkdir()
    for suffix in ("", "_states"):
        shutil.copyfile(run / f"{ours}_{EPOCH}{suffix}.pt", models / f"{theirs}_{EPOCH}{suffix}.pt")
    settings.MODELS_DIR = models
    config = torch.load(models / f"{theirs}_{EPOCH}.pt", weights_only=True)["config"]
    device = torch.device("cpu")
    common = {"network": "pvt_v2_b0", "model_config": config, "size": "32", "resume_epoch": EPOCH, "epochs": 10}
    if kind == "mmcr":
        args = train_mmcr.args_from_dict(
            **common, data_path=[str(run)], projector_dims=PROJECTOR_DIMS, load_states=True
        )
        backbone = registry.net_factory("pvt_v2_b0", 0, 3, config=args.model_config, size=args.size)
        net = MMCR(backbone, config={"projector_dims": args.projector_dims})
        net, training_states = fs_ops.load_simple_checkpoint(device, net, theirs, epoch=EPOCH, strict=True)
        for parameter in net.momentum_encoder.parameters():
            parameter.requires_grad_(False)
    else:
        args = train.args_from_dict(**common, tag="finetune", data_path=str(run), val_path=str(run), load_states=True)
        net, _, _, training_states = fs_ops.load_checkpoint(
            device, "pvt_v2_b0", config=args.model_config, tag="finetune", epoch=EPOCH
        )
    optimizer, scheduler = birder_optimizer(net, args)
    record: dict[str, Any] = {
        "birder_param_shapes": [list(p.shape) for group in optimizer.param_groups for p in group["params"]],
        "birder_group_sizes": [len(group["params"]) for group in optimizer.param_groups],
    }
    # recorded before loading: birder's step below updates the loaded buffers in place
    our_buffers = [
        tensor_facts(s["momentum_buffer"])
        for s in training_states.optimizer_state["state"].values()
        if "momentum_buffer" in s  # SGD's; our recipe's AdamW has none
    ]
    try:
        optimizer.load_state_dict(training_states.optimizer_state)
        scheduler.load_state_dict(training_states.scheduler_state)
    except (ValueError, KeyError) as exc:
        record["refused"] = f"{type(exc).__name__}: {exc}"
        return record
    # one more training step exactly as birder's loop takes it, on the loaded states
    net.train()
    if kind == "mmcr":
        views = torch.randn(4, 2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        z, z_m = net(views)
        loss = MMCRMomentumLoss(args.lambda_coeff, n_aug=args.n_aug)(z, z_m)
    else:
        images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        loss = torch.nn.CrossEntropyLoss(label_smoothing=args.smoothing_alpha)(net(images), torch.tensor([0, 1, 0, 1]))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    state = optimizer.state_dict()
    groups = [
        {key: (value if key != "params" else len(value)) for key, value in group.items()}
        for group in state["param_groups"]
    ]
    record.update(
        {
            "loaded": True,
            "stepped_after_load": bool(torch.isfinite(loss)),
            "states_file_keys": sorted(torch.load(models / f"{theirs}_{EPOCH}_states.pt", weights_only=True)),
            "extra_states": sorted(training_states.extra_states or {}),
            "optimizer_class": type(optimizer).__name__,
            "param_groups": groups,
            "scheduler_class": type(scheduler).__name__,
            "scheduler_state": {k: v for k, v in scheduler.state_dict().items() if not k.startswith("_")},
            "scheduler_last_lr": scheduler.get_last_lr(),
            "momentum_buffers": our_buffers,
        }
    )
    return record


def canonical_op(transform: Any) -> dict[str, Any]:
    """One of ``BirderAugment``'s transformations as the dict ``birder_augment.birder_ops`` uses."""
    from birder.data.transforms import classification as birder_tf
    from torchvision.transforms import v2

    def floats(values: Any) -> list[float]:
        return [float(v) for v in values]

    if isinstance(transform, v2.Identity):
        return {"op": "identity"}
    if isinstance(transform, v2.RandomAffine):
        mode = getattr(transform.interpolation, "value", transform.interpolation)
        assert mode == "nearest" and transform.fill == 0, (mode, transform.fill)
        if transform.translate is not None:
            return {"op": "translate", "translate": floats(transform.translate)}
        if transform.shear is not None:
            return {"op": "shear", "shear": floats(transform.shear)}
        return {"op": "rotate", "degrees": floats(transform.degrees)}
    if isinstance(transform, v2.ColorJitter):
        fields = ("brightness", "contrast", "saturation", "hue")
        return {"op": "color_jitter", **{k: floats(getattr(transform, k)) for k in fields if getattr(transform, k)}}
    if isinstance(transform, birder_tf.RandomSaturationWithVariation):
        assert transform.p == 1.0
        return {"op": "saturation", "factor": transform.factor, "variation": transform.factor_variation}
    if isinstance(transform, v2.RandomPosterize):
        assert transform.p == 1.0
        return {"op": "posterize", "bits": transform.bits}
    if isinstance(transform, v2.GaussianBlur):
        return {"op": "gaussian_blur", "kernel_size": list(transform.kernel_size), "sigma": floats(transform.sigma)}
    if isinstance(transform, v2.RandomAutocontrast):
        assert transform.p == 1.0
        return {"op": "autocontrast"}
    if isinstance(transform, birder_tf.RandomAdjustSharpnessWithVariation):
        assert transform.p == 1.0
        return {"op": "sharpness", "factor": transform.factor, "variation": transform.factor_variation}
    if isinstance(transform, birder_tf.RandomSolarizeWithVariableThreshold):
        assert transform.p == 1.0
        return {"op": "solarize", "threshold": transform.threshold, "variation": transform.threshold_variation}
    if isinstance(transform, v2.RandomGrayscale):
        return {"op": "grayscale"}
    raise TypeError(f"unknown birder transformation {transform!r}")


def augmentation_facts() -> dict[str, Any]:
    """What ``training_preset(..., "birder", level)`` builds at every level, with the scripts' defaults."""
    from birder.data.transforms import classification as birder_tf
    from torchvision.transforms import v2

    levels = {}
    for level in range(11):
        preset = birder_tf.training_preset((32, 32), "birder", level, birder_tf.get_rgb_stats("birder"))
        kinds = [type(t).__name__ for t in preset.transforms]
        if level == 0:
            resize = preset.transforms[0]
            levels[str(level)] = {"transforms": kinds, "resize_interpolation": resize.interpolation.value}
            continue
        crop = next(t for t in preset.transforms if isinstance(t, birder_tf.RandomResizedCropWithRandomInterpolation))
        augment = next(t for t in preset.transforms if isinstance(t, birder_tf.BirderAugment))
        flip = next(t for t in preset.transforms if isinstance(t, v2.RandomHorizontalFlip))
        erase = augment.re
        levels[str(level)] = {
            "transforms": kinds,
            "crop_interpolations": [t.interpolation.value for t in crop.transform],
            "crop_scale": [float(v) for v in crop.transform[0].scale],
            "crop_ratio": [float(v) for v in crop.transform[0].ratio],
            "min_ops": augment.min_ops,
            "max_ops": augment.max_ops,
            "ops": [canonical_op(t) for t in augment.transformations],
            "erase_prob": float(erase.p) if isinstance(erase, v2.RandomErasing) else 0.0,
            "erase_scale": [float(v) for v in erase.scale] if isinstance(erase, v2.RandomErasing) else None,
            "erase_ratio": [float(v) for v in erase.ratio] if isinstance(erase, v2.RandomErasing) else None,
            "erase_value": list(erase.value) if isinstance(erase, v2.RandomErasing) else None,
            "flip_p": float(flip.p),
        }
    grayscale = birder_tf.BirderAugment(4, use_grayscale=True).transformations[-1]
    return {"levels": levels, "grayscale_op": canonical_op(grayscale)}


def script_defaults() -> dict[str, Any]:
    """The optimizer, schedule and augmentation defaults of birder's MMCR and classification scripts."""
    from birder.scripts import train, train_mmcr

    names = (
        "opt", "momentum", "nesterov", "lr", "wd", "norm_wd", "bias_weight_decay", "lr_scale", "lr_scheduler",
        "lr_scheduler_update", "warmup_epochs", "warmup_steps", "clip_grad_norm", "aug_type", "aug_level",
        "resize_min_scale", "re_prob", "use_grayscale", "sync_bn", "no_broadcast_buffers", "rgb_mode",
    )  # fmt: skip
    result = {}
    for script in (train_mmcr, train):
        parser = script.get_args_parser()
        result[script.__name__.rsplit(".", 1)[-1]] = {name: parser.get_default(name) for name in names}
    result["train"]["smoothing_alpha"] = train.get_args_parser().get_default("smoothing_alpha")
    return result


def op_outputs() -> dict[str, Any]:
    """torchvision's output for each op at fixed parameters on a fixed uint8 image (birder runs them on uint8)."""
    import torch
    from torchvision.transforms import v2
    from torchvision.transforms.v2 import functional as F

    image = (torch.rand(3, 12, 14, generator=torch.Generator().manual_seed(7)) * 255).to(torch.uint8)
    nearest = v2.InterpolationMode.NEAREST
    cases = {
        "rotate": F.affine(image, angle=9.0, translate=[0, 0], scale=1.0, shear=[0.0, 0.0], interpolation=nearest),
        "translate": F.affine(image, angle=0.0, translate=[2, -1], scale=1.0, shear=[0.0, 0.0], interpolation=nearest),
        "shear": F.affine(image, angle=0.0, translate=[0, 0], scale=1.0, shear=[8.0, 0.0], interpolation=nearest),
        "posterize": F.posterize(image, 7),
        "autocontrast": F.autocontrast(image),
        "sharpness": F.adjust_sharpness(image, 1.3),
        "solarize": F.solarize(image, 200),
        "hue": F.adjust_hue(image, 0.05),
        "gaussian_blur": F.gaussian_blur(image, [3, 3], [0.8, 0.8]),
    }  # fmt: skip
    return {
        "image": image.tolist(),
        "parameters": {
            "rotate": {"angle": 9.0},
            "translate": {"translate": [2, -1]},
            "shear": {"shear": [8.0, 0.0]},
            "posterize": {"bits": 7},
            "sharpness": {"factor": 1.3},
            "solarize": {"threshold": 200},
            "hue": {"shift": 0.05},
            "gaussian_blur": {"kernel_size": 3, "sigma": 0.8},
        },
        "outputs": {name: value.tolist() for name, value in cases.items()},
    }


def main() -> None:
    import birder

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        commands = json.dumps({"mmcr": COMMAND, "finetune": FINETUNE_COMMAND})
        subprocess.run(
            [str(OUR_PYTHON), "-c", OUR_RUN, str(root), str(IMAGES_PER_CLASS), commands], check=True, cwd=REPO
        )
        ours_birder = load_into_birder(root / "birder-mmcr", root / "models", "mmcr")
        ours_default = load_into_birder(root / "pvt-deploy-mmcr", root / "models", "mmcr")
        finetune_birder = load_into_birder(root / "birder-finetune", root / "models", "finetune")
        finetune_default = load_into_birder(root / "pvt-deploy-finetune", root / "models", "finetune")
    for name, result in (("train mmcr", ours_birder), ("train finetune", finetune_birder)):
        if "refused" in result:
            sys.exit(f"birder refused the {name} --recipe birder states: {result['refused']}")
    record = {
        "birder_version": birder.__version__,
        "made_by": {
            "command": ["pvt-deploy", *COMMAND],
            "finetune_command": ["pvt-deploy", *FINETUNE_COMMAND],
            "recipes": ["birder", "pvt-deploy"],
        },
        "images_per_class": IMAGES_PER_CLASS,
        "epoch": EPOCH,
        "recipe_birder_states_in_birder": ours_birder,
        "recipe_default_states_in_birder": {
            "refused": ours_default.get("refused"),
            "birder_group_sizes": ours_default["birder_group_sizes"],
        },
        "finetune_recipe_birder_states_in_birder": finetune_birder,
        "finetune_recipe_default_states_in_birder": {
            "refused": finetune_default.get("refused"),
            "birder_group_sizes": finetune_default["birder_group_sizes"],
        },
        "augmentation": augmentation_facts(),
        "script_defaults": script_defaults(),
        "op_outputs": op_outputs(),
    }
    RESULT.write_text(json.dumps(record, indent=1) + "\n")
    summary = {k: ours_birder[k] for k in ("loaded", "stepped_after_load", "param_groups", "scheduler_last_lr")}
    print(json.dumps({**summary, "default_recipe": record["recipe_default_states_in_birder"]["refused"]}))
    print(json.dumps({k: finetune_birder[k] for k in ("loaded", "stepped_after_load", "birder_group_sizes")}))
    print(json.dumps({"finetune_default_recipe": finetune_default.get("refused")}))


if __name__ == "__main__":
    main()
