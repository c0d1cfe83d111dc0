"""``pvt-deploy bench``: PyTorch eager, torch.compile and onnxruntime at each exported precision, timed in one
interleaved run next to this machine's sgemm rate, with each variant's fidelity beside its speed.

Its runners import torch (the reference runs in PyTorch): ``run``, ``runners`` and ``flops`` are for the ``export``
install. ``machine`` is standard library only, so torch-free benchmarks (serving, bulk jobs, search) name the CPU
with it too.
"""
