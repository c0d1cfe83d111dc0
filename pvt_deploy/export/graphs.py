"""The three exported graphs as small ``nn.Module`` wrappers around one ``PVTv2``.

Each wrapper's ``forward`` returns exactly the outputs named in ``manifest.GRAPH_OUTPUTS`` in that order, so the
exporter, the verifier and the runtime agree on names by construction.
"""

from __future__ import annotations

import torch
from torch import nn

from pvt_deploy.format.manifest import GRAPH_OUTPUTS
from pvt_deploy.model.pvt_v2 import PVTv2


class ClassifyGraph(nn.Module):
    """probabilities, logits, embedding: what birder's ``infer_image(..., return_embedding=True)`` gives."""

    def __init__(self, model: PVTv2) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        embedding = self.model.embedding(x)
        logits = self.model.classify(embedding)
        return torch.softmax(logits, dim=1), logits, embedding


class EmbedGraph(nn.Module):
    """The pooled last-stage embedding only (N, embed_dims[-1]); skips the classifier head."""

    def __init__(self, model: PVTv2) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.embedding(x)


class FeaturesGraph(nn.Module):
    """stage1..stage4 NCHW maps (strides 4, 8, 16, 32), e.g. for a detection neck."""

    def __init__(self, model: PVTv2) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        stages = self.model.detection_features(x)
        return tuple(stages[name] for name in GRAPH_OUTPUTS["features"])


GRAPH_WRAPPERS: dict[str, type[nn.Module]] = {
    "classify": ClassifyGraph,
    "embed": EmbedGraph,
    "features": FeaturesGraph,
}


def wrap(model: PVTv2, graph: str) -> nn.Module:
    """The eval-mode wrapper for one graph name."""
    return GRAPH_WRAPPERS[graph](model).eval()


def reference_outputs(model: PVTv2, graph: str, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """PyTorch's answer for ``graph`` as {output name: tensor}, the parity reference."""
    with torch.inference_mode():
        result = wrap(model, graph)(batch)
    if isinstance(result, torch.Tensor):
        result = (result,)
    return dict(zip(GRAPH_OUTPUTS[graph], result, strict=True))


def reference_all(model: PVTv2, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every output of every graph from ONE PyTorch pass (same modules in the same order as the wrappers)."""
    with torch.inference_mode():
        stages = model.detection_features(batch)
        embedding = model.embedding_from_features(stages["stage4"])
        logits = model.classify(embedding)
        return {"probabilities": torch.softmax(logits, dim=1), "logits": logits, "embedding": embedding, **stages}
