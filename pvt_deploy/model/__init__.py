"""The PyTorch reference PVT v2 (needs torch)."""

from pvt_deploy.model.pvt_v2 import (
    BIRDER_LAYER_NORM_EPS,
    PVT_V2_CONFIGS,
    STAGE_NAMES,
    TRAINING_LAYER_NORM_EPS,
    PVTv2,
    PVTv2Config,
    create_model,
)

__all__ = [
    "BIRDER_LAYER_NORM_EPS",
    "PVT_V2_CONFIGS",
    "PVTv2",
    "PVTv2Config",
    "STAGE_NAMES",
    "TRAINING_LAYER_NORM_EPS",
    "create_model",
]
