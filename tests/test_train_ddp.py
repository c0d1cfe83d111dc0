"""torchrun with 2 CPU processes (gloo) equals one process with the same global batch.

What makes it equal: each rank takes a contiguous slice of every global batch, the projector's BatchNorm uses
statistics over the gathered global batch (GlobalBatchNorm1d), and the loss is computed on gathered matrices
with a gather whose backward sums the ranks' gradients; DDP's averaging then gives exactly the one-process
gradient. This file doubles as the torchrun worker for the gradient check (``python tests/test_train_ddp.py OUT``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
TINY = ["--network", "pvt_v2_tiny", "--size", "32", "--projector-dims", "64,64,32", "--batch-size", "8"]


def _torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def _run(command: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def _grad_worker(out: Path, ddp_gradient: str = "exact") -> None:
    """One forward/backward of MMCR on a fixed global batch; rank 0 saves loss and every gradient."""
    from pvt_deploy.train.distributed import init_distributed, shutdown_distributed, wrap_ddp
    from pvt_deploy.train.mmcr import mmcr_momentum_loss
    from pvt_deploy.train.pretrain import MMCRConfig, build_mmcr

    torch.set_num_threads(1)
    env = init_distributed("cpu")
    net = build_mmcr(MMCRConfig(network="pvt_v2_tiny", size=(32, 32), projector_dims=(64, 64, 32)), seed=0)
    views = torch.randn(8, 2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    local = 8 // env.world_size
    views = views[env.rank * local : (env.rank + 1) * local]
    model = wrap_ddp(net, env) if env.distributed else net
    z, z_momentum = model(views)
    loss = mmcr_momentum_loss(z, z_momentum, n_aug=2, ddp_gradient=ddp_gradient)
    loss.backward()
    if env.is_primary:
        grads = {name: p.grad.detach().clone() for name, p in net.named_parameters() if p.grad is not None}
        torch.save({"loss": loss.detach(), "grads": grads, "bn": net.encoder.projector[1].running_var.clone()}, out)
    shutdown_distributed()


@pytest.mark.slow
def test_two_process_gradients_equal_one_process(tmp_path: Path) -> None:
    script = str(Path(__file__).resolve())
    _run([sys.executable, script, str(tmp_path / "one.pt")])
    _run([*_torchrun(2), script, str(tmp_path / "two.pt")])
    one = torch.load(tmp_path / "one.pt", weights_only=True)
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    assert torch.allclose(one["loss"], two["loss"], rtol=1e-6)
    assert torch.allclose(one["bn"], two["bn"], rtol=1e-5)  # BatchNorm saw the global batch on both
    assert one["grads"].keys() == two["grads"].keys() and len(one["grads"]) > 20
    norm_one = torch.linalg.vector_norm(torch.stack([g.norm() for g in one["grads"].values()]))
    norm_two = torch.linalg.vector_norm(torch.stack([g.norm() for g in two["grads"].values()]))
    # a detached gather would give 1/world_size of this; per-rank BatchNorm would change it too
    assert norm_two.item() == pytest.approx(norm_one.item(), rel=1e-5)
    for name, grad in one["grads"].items():
        assert torch.allclose(grad, two["grads"][name], rtol=1e-4, atol=1e-6 * norm_one.item()), name


@pytest.mark.slow
def test_birder_gather_gives_each_rank_only_its_own_slice_of_the_gradient(tmp_path: Path) -> None:
    """``--recipe birder``'s convention: the loss is the same global loss, the gradient 1/world_size of it."""
    script = str(Path(__file__).resolve())
    _run([sys.executable, script, str(tmp_path / "one.pt")])
    _run([*_torchrun(2), script, str(tmp_path / "two.pt"), "local-slice"])
    one = torch.load(tmp_path / "one.pt", weights_only=True)
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    assert torch.allclose(one["loss"], two["loss"], rtol=1e-6)
    assert one["grads"].keys() == two["grads"].keys()
    scale = max(g.abs().max().item() for g in one["grads"].values())
    for name, grad in one["grads"].items():
        assert torch.allclose(grad / 2, two["grads"][name], rtol=1e-4, atol=1e-6 * scale), name


@pytest.mark.slow
def test_two_process_cli_run_tracks_one_process_run(tmp_path: Path) -> None:
    from tests.test_train_data import make_image_folder

    data = make_image_folder(tmp_path / "data", per_class=8)
    common = ["train", "mmcr", str(data), *TINY, "--steps", "3", "--workers", "0", "--threads", "1", "--no-progress"]
    _run([sys.executable, "-m", "pvt_deploy", *common, "--out", str(tmp_path / "one")])
    _run([*_torchrun(2), "-m", "pvt_deploy", *common, "--out", str(tmp_path / "two")])
    losses = {
        run: [json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("one", "two")
    }
    assert len(losses["one"]) == 3
    assert losses["two"] == pytest.approx(losses["one"], rel=1e-5)
    one = torch.load(tmp_path / "one" / "mmcr_pvt_v2_tiny_3.pt", weights_only=True)["state"]
    two = torch.load(tmp_path / "two" / "mmcr_pvt_v2_tiny_3.pt", weights_only=True)["state"]
    assert one.keys() == two.keys()
    # Adam turns float round-off on (theoretically) zero gradients -- e.g. the last norm's bias, whose shift the
    # projector's BatchNorm removes -- into lr-sized steps, so weights agree to a fraction of lr (1e-3), not 1e-6.
    for key in one:
        assert torch.allclose(one[key].float(), two[key].float(), atol=3e-4), key

    # fine-tuning: cross-entropy is a mean over each rank's equal share, DDP averages -> the global mean's gradient
    init = str(tmp_path / "one" / "pvt_v2_tiny_mmcr_3.pt")
    tune = ["train", "finetune", str(data), "--init", init, "--batch-size", "8", "--steps", "2", "--workers", "0",
            "--threads", "1", "--no-progress"]  # fmt: skip
    _run([sys.executable, "-m", "pvt_deploy", *tune, "--out", str(tmp_path / "ft_one")])
    _run([*_torchrun(2), "-m", "pvt_deploy", *tune, "--out", str(tmp_path / "ft_two")])
    tuned = {
        run: [json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("ft_one", "ft_two")
    }
    assert len(tuned["ft_one"]) == 2 and tuned["ft_two"] == pytest.approx(tuned["ft_one"], rel=1e-5)


if __name__ == "__main__":
    _grad_worker(Path(sys.argv[1]), *sys.argv[2:3])
