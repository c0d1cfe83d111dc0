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
    """Export failed or the exported graph failed its parity check (an existing output folder is ``OutputError``)."""

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


class UsageError(PvtDeployError):
    """A command-line mistake found once the options are parsed: inputs that select nothing (no images, a glob
    that matches nothing, a list that is not a list of paths) or an option out of range for this machine."""

    exit_code = 2


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


class InferenceError(PvtDeployError):
    """onnxruntime failed to run a graph or to allocate its memory (a graph that expands beyond memory, an input
    the graph cannot take): its own code, since the folder may be sound and the batch or the machine too small."""

    exit_code = 14


class ServeError(PvtDeployError):
    """``serve`` options are unusable (e.g. ``--api-key-env`` names an unset variable)."""

    exit_code = 2


class JobInterrupted(PvtDeployError):
    """Ctrl-C during a bulk job: the finished rows are kept, and the message says how to continue."""

    exit_code = 130


class RunnerUnavailable(PvtDeployError):
    """A bench variant that cannot run here (no GPU, torch.compile failing or too slow): reported as skipped."""


class MissingExtraError(PvtDeployError):
    """A command needs an optional extra (torch for export, psutil for bench, ...) that is not installed."""

    exit_code = 11


class ServiceStartError(PvtDeployError):
    """``serve`` cannot listen where it was told (the port is in use, the host is not an address of this machine)."""

    exit_code = 13


EXIT_CODES: dict[int, str] = {
    0: "success",
    OutputError.exit_code: "the output is in the way (exists without --overwrite/--force, locked, or unfinished)",
    CheckpointError.exit_code: "bad checkpoint, or bad command-line usage",
    DownloadError.exit_code: "download failed",
    ImageError.exit_code: "some inputs failed (each named on stderr; the rest are answered)",
    ModelDirError.exit_code: "model folder missing, invalid or failing its checksums",
    ExportError.exit_code: "export failed",
    VerificationError.exit_code: "a verify threshold failed",
    DatasetError.exit_code: "training data unusable",
    TrainingError.exit_code: "training cannot start or continue",
    DeviceError.exit_code: "CUDA asked for but not usable",
    MissingExtraError.exit_code: "the command needs an optional extra that is not installed",
    SearchIndexError.exit_code: "search store missing or unusable",
    ServiceStartError.exit_code: "the service cannot listen (port in use, or a host that is not this machine's)",
    InferenceError.exit_code: "onnxruntime could not run a graph (out of memory, or shapes it cannot take)",
    130: "interrupted (Ctrl-C)",
}
"""Every exit code the CLI uses, the one table the docs are checked against (tests/test_exit_codes.py)."""
