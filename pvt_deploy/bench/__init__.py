"""``pvt-deploy bench``: PyTorch eager, torch.compile and onnxruntime at each exported precision, timed in one
interleaved run next to this machine's sgemm rate, with each variant's fidelity beside its speed.

Imports torch (the reference runs in PyTorch): this package is for the ``export`` install, never the runtime path.
"""

from pvt_deploy.bench.flops import flops_per_image

__all__ = ["flops_per_image"]
