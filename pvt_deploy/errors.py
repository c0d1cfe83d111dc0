"""Typed exceptions. The CLI turns any ``PvtDeployError`` into one line on stderr and its ``exit_code``."""

from __future__ import annotations


class PvtDeployError(Exception):
    """Base class: a user-facing problem with a clear one-line message."""

    exit_code = 1


class CheckpointError(PvtDeployError):
    """A file is not a loadable birder PVT v2 checkpoint (missing, wrong format, unsafe, wrong shapes)."""

    exit_code = 2


class DownloadError(PvtDeployError):
    """A published weight file could not be fetched or failed its sha256 check."""

    exit_code = 3


class ImageError(PvtDeployError):
    """One input image could not be decoded or has the wrong shape/dtype."""

    exit_code = 4


class ModelDirError(PvtDeployError):
    """An exported folder is missing, incomplete, or fails its manifest checksums."""

    exit_code = 5


class ExportError(PvtDeployError):
    """Export failed or the exported graph failed its parity check."""

    exit_code = 6


class VerificationError(PvtDeployError):
    """``verify`` found a parity threshold exceeded."""

    exit_code = 7


class DatasetError(PvtDeployError):
    """A training data folder is missing, empty, or has no usable class folders."""

    exit_code = 8


class TrainingError(PvtDeployError):
    """A training run cannot start or continue (bad options, missing or mismatched resume state)."""

    exit_code = 9


class OutputError(PvtDeployError):
    """The output location is in a state the command will not overwrite or cannot use."""

    exit_code = 1


class BenchError(PvtDeployError):
    """``bench`` options or inputs are unusable."""

    exit_code = 2


class DeviceError(PvtDeployError):
    """``device="cuda"`` was asked for but onnxruntime cannot run on a CUDA device here."""

    exit_code = 10


class SearchIndexError(PvtDeployError):
    """A search store is missing or unusable, or its source holds no embeddings."""

    exit_code = 12
