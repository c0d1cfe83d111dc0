"""The resumable on-disk state of one bulk job, and the final files it becomes.

While a job runs, everything lives in ``<out>.partial/``::

    plan.json           what the job is (task, options, model identity, input count and digest); written first
    inputs.txt          the ordered input list, one path a line
    part-000000.json    the rows of inputs [start, stop): index, path, status, error, labels, probabilities, file
    part-000000.npy     their embeddings (one row each, NaN for failed inputs), embed jobs only; written BEFORE
                        the .json, so a part counts as done only when its .json exists (every file tmp -> rename)
                        the .json also holds each input's size and mtime when its row was written, so a resume
                        recomputes the parts whose files changed since
    features/           feature-map .npz files (features jobs), one per successful input

A SIGKILL at any moment leaves whole parts plus ``*.tmp`` files, which resume ignores and removes. ``finalize``
writes the requested format to a staging name and renames it onto ``<out>`` in one step, so ``<out>`` is either
absent or complete: Parquet (one row group per part), JSON Lines, CSV, an ``.npy`` folder (embeddings.npy +
paths.txt + errors.json + run.json) or a folder of ``.npz`` feature maps with ``index.jsonl``.
Needs numpy only; Parquet output imports pyarrow (the ``[bulk]`` extra).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pvt_deploy.errors import OutputError
from pvt_deploy.files import atomic_write_bytes, atomic_write_json
from pvt_deploy.staging import staging_path

PLAN_NAME = "plan.json"
INPUTS_NAME = "inputs.txt"
FEATURES_DIR = "features"
RUN_NAME = "run.json"

TABLE_FORMATS = {".parquet": "parquet", ".jsonl": "jsonl", ".csv": "csv"}


def output_format(out: Path, task: str) -> str:
    """``parquet`` / ``jsonl`` / ``csv`` by suffix; otherwise a folder (``npy`` for embed, ``npz`` for features)."""
    found = TABLE_FORMATS.get(out.suffix.lower())
    if found == "csv" and task == "embed":
        raise OutputError(f"{out}: CSV cannot hold embeddings; use .parquet, .jsonl or a folder")
    if found is not None:
        return found
    if task == "predict":
        raise OutputError(f"{out}: predict writes .jsonl, .csv or .parquet (or stdout without --out)")
    if out.suffix.lower() == ".npz":
        raise OutputError(f"{out}: a .npz file holds one image's maps; give a folder for many images")
    return "npy" if task == "embed" else "npz"


def inputs_digest(inputs: list[str]) -> str:
    return hashlib.sha256("\n".join(inputs).encode("utf-8", "surrogateescape")).hexdigest()


@dataclass
class Part:
    """Rows of inputs ``[start, stop)`` and, for embed jobs, their embeddings (NaN rows where an input failed)."""

    index: int
    start: int
    stop: int
    rows: list[dict[str, Any]]

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [row for row in self.rows if row["status"] != "ok"]


def partial_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def features_dir(out: Path) -> Path:
    """Where a features job's per-image ``.npz`` files go while it runs."""
    return partial_dir(out) / FEATURES_DIR


Fingerprint = list[int] | None
"""An input file's ``[size, mtime_ns]`` (None: it could not be read), to notice a file changed since its row."""


def input_fingerprint(path: str) -> Fingerprint:
    try:
        stat = os.stat(path)
    except (OSError, ValueError):
        return None
    return [stat.st_size, stat.st_mtime_ns]


def check_work_folder(work: Path) -> None:
    """Refuse an ``OUT.partial`` that is not a plain folder (a file, or a symlink that is never followed)."""
    if work.is_symlink():
        raise OutputError(f"{work} is a symbolic link, not a run folder; remove it (it is never followed)")
    if work.exists() and not work.is_dir():
        raise OutputError(f"{work} is a file, not a run folder; remove it or pass --overwrite")


class JobStore:
    """The ``<out>.partial`` folder of one job."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.work = partial_dir(out)

    @property
    def features_dir(self) -> Path:
        return features_dir(self.out)

    # --- plan -----------------------------------------------------------------------------------------------------

    def start(self, plan: dict[str, Any], inputs: list[str]) -> None:
        """A new run: whatever is at ``OUT.partial`` (a folder, a file, or a link, which is removed, not followed)
        is replaced."""
        _remove(self.work)
        self.work.mkdir(parents=True)
        atomic_write_bytes(
            self.work / INPUTS_NAME, "".join(p + "\n" for p in inputs).encode("utf-8", "surrogateescape")
        )
        atomic_write_json(self.work / PLAN_NAME, plan)

    def has_plan(self) -> bool:
        return (self.work / PLAN_NAME).is_file()

    def plan(self) -> dict[str, Any]:
        try:
            plan = json.loads((self.work / PLAN_NAME).read_text(encoding="utf-8"))
            if not isinstance(plan, dict) or int(plan.get("chunk_size", 0)) < 1:
                raise ValueError("incomplete plan")
            return plan
        except (OSError, ValueError, TypeError) as exc:
            raise OutputError(f"{self.work}: cannot resume, its {PLAN_NAME} is unreadable ({exc})") from None

    # --- parts ----------------------------------------------------------------------------------------------------

    def _part_path(self, index: int, suffix: str) -> Path:
        return self.work / f"part-{index:06d}{suffix}"

    def completed_parts(self) -> tuple[list[Part], str | None]:
        """Parts 0..k-1 that are complete and whose input files are as they were when each was written (size,
        mtime), in order, and the first input found changed (None: none was). What follows (a part cut off
        mid-write, or one whose inputs changed) is removed, to be computed again."""
        parts: list[Part] = []
        changed = None
        while (found := self._read_part(len(parts))) is not None:
            part, recorded = found
            current = [input_fingerprint(row["path"]) for row in part.rows]
            if recorded != current:
                changed = next(
                    (row["path"] for row, a, b in zip(part.rows, recorded or [], current, strict=False) if a != b),
                    part.rows[0]["path"] if part.rows else "?",
                )
                break
            parts.append(part)
        for leftover in self.work.iterdir():
            index = _part_index(leftover.name)
            if leftover.name.endswith(".tmp") or (index is not None and index >= len(parts)):
                leftover.unlink(missing_ok=True)
        return parts, changed

    def _read_part(self, index: int) -> tuple[Part, list[Fingerprint] | None] | None:
        """Part ``index`` and its inputs' recorded fingerprints (None when it has none), or None if unreadable."""
        path = self._part_path(index, ".json")
        if not path.is_file():
            return None
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
            part = Part(index, int(meta["start"]), int(meta["stop"]), list(meta["rows"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        recorded = meta.get("fingerprints")
        return part, recorded if isinstance(recorded, list) and len(recorded) == len(part.rows) else None

    def write_part(self, part: Part, embeddings: np.ndarray | None) -> None:
        if embeddings is not None:
            if embeddings.shape[0] != len(part.rows):
                raise ValueError("one embedding row per input row")
            buffer = io.BytesIO()
            np.save(buffer, np.ascontiguousarray(embeddings, np.float32), allow_pickle=False)
            atomic_write_bytes(self._part_path(part.index, ".npy"), buffer.getvalue())
        fingerprints = [input_fingerprint(row["path"]) for row in part.rows]
        meta = {"start": part.start, "stop": part.stop, "rows": part.rows, "fingerprints": fingerprints}
        atomic_write_json(self._part_path(part.index, ".json"), meta)

    def embeddings(self, part: Part) -> np.ndarray | None:
        path = self._part_path(part.index, ".npy")
        return np.load(path, allow_pickle=False) if path.is_file() else None

    # --- the final output -----------------------------------------------------------------------------------------

    def finalize(self, parts: list[Part], fmt: str, run_info: dict[str, Any], dim: int | None) -> Path:
        """Write ``fmt`` to a staging name, rename it onto ``out`` (replacing what is there) and drop the work."""
        staging = staging_path(self.out, "tmp")
        _remove(staging)
        if fmt in ("npy", "npz"):
            staging.mkdir(parents=True)
        writer = {
            "parquet": self._write_parquet,
            "jsonl": self._write_jsonl,
            "csv": self._write_csv,
            "npy": self._write_npy_folder,
            "npz": self._write_npz_folder,
        }[fmt]
        try:
            writer(staging, parts, run_info, dim)
        except OSError as exc:  # a full disk, a file-size limit: the parts stay, so --resume writes it again
            _remove(staging)
            raise OutputError(
                f"cannot write {self.out} ({exc.strerror or exc}); every finished row is kept in {self.work}: "
                "make room and run the same command with --resume"
            ) from None
        old = None
        if self.out.exists() or self.out.is_symlink():
            old = staging_path(self.out, "old")
            self.out.rename(old)
        staging.rename(self.out)
        if fmt in ("jsonl", "csv"):
            atomic_write_json(run_info_path(self.out), run_info)
        if old is not None:
            _remove(old)
        shutil.rmtree(self.work, ignore_errors=True)
        return self.out

    def _rows(self, parts: list[Part], run_info: dict[str, Any]) -> Iterator[tuple[dict[str, Any], Any]]:
        """Each row with its embedding (a float32 row, or None), and the random-weights mark when it applies."""
        mark = {"random_weights": True} if run_info.get("random_weights") else {}
        for part in parts:
            embeddings = self.embeddings(part)
            for position, row in enumerate(part.rows):
                vector = None
                if embeddings is not None and row["status"] == "ok":
                    vector = embeddings[position]
                yield {**row, **mark}, vector

    def _write_jsonl(self, path: Path, parts: list[Part], run_info: dict[str, Any], dim: int | None) -> None:
        with open(path, "w", encoding="utf-8") as handle:
            for row, vector in self._rows(parts, run_info):
                if run_info["task"] == "embed":
                    row["embedding"] = None if vector is None else [float(v) for v in vector]
                handle.write(json.dumps(row) + "\n")

    def _write_csv(self, path: Path, parts: list[Part], run_info: dict[str, Any], dim: int | None) -> None:
        with open(path, "w", encoding="utf-8", newline="") as handle:
            writer: csv.DictWriter | None = None
            for row, _vector in self._rows(parts, run_info):
                flat = {key: json.dumps(value) if isinstance(value, list) else value for key, value in row.items()}
                if writer is None:
                    writer = csv.DictWriter(handle, fieldnames=list(flat))
                    writer.writeheader()
                writer.writerow(flat)

    def _write_parquet(self, path: Path, parts: list[Part], run_info: dict[str, Any], dim: int | None) -> None:
        from pvt_deploy.jobs.arrow import write_parquet

        write_parquet(path, ((part.rows, self.embeddings(part)) for part in parts), run_info, dim)

    def _write_npy_folder(self, folder: Path, parts: list[Part], run_info: dict[str, Any], dim: int | None) -> None:
        ok = sum(len(part.rows) - len(part.failed) for part in parts)
        matrix = np.lib.format.open_memmap(folder / "embeddings.npy", mode="w+", dtype=np.float32, shape=(ok, dim or 0))
        paths, errors, row = [], [], 0
        for part in parts:
            embeddings = self.embeddings(part)
            for position, record in enumerate(part.rows):
                if record["status"] == "ok":
                    matrix[row] = embeddings[position]
                    paths.append(record["path"])
                    row += 1
                else:
                    errors.append({"path": record["path"], "error": record["error"]})
        matrix.flush()
        del matrix
        (folder / "paths.txt").write_text("".join(p + "\n" for p in paths), encoding="utf-8")
        (folder / "errors.json").write_text(json.dumps(errors, indent=1) + "\n", encoding="utf-8")
        info = {**run_info, "rows": ok}  # rows of embeddings.npy; the failed inputs are in errors.json
        (folder / RUN_NAME).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")

    def _write_npz_folder(self, folder: Path, parts: list[Part], run_info: dict[str, Any], dim: int | None) -> None:
        with open(folder / "index.jsonl", "w", encoding="utf-8") as handle:
            for row, _vector in self._rows(parts, run_info):
                if row.get("file"):  # a hard link: the work folder stays whole until the final rename
                    os.link(self.features_dir / row["file"], folder / row["file"])
                handle.write(json.dumps(row) + "\n")
        (folder / RUN_NAME).write_text(json.dumps(run_info, indent=1) + "\n", encoding="utf-8")


def run_info_path(out: Path) -> Path:
    """Where a finished job's run metadata lives: inside folders, in Parquet's own metadata, else a sidecar."""
    if out.is_dir():
        return out / RUN_NAME
    return out.with_name(out.name + ".run.json")


def read_run_info(out: Path) -> dict[str, Any] | None:
    """The run metadata of a finished output (task, options, model, runtime configuration, engine, counts), or
    None when ``out`` is not one this tool finished."""
    try:
        if out.suffix.lower() == ".parquet" and out.is_file():
            from pvt_deploy.jobs.arrow import read_parquet_run_info

            return read_parquet_run_info(out)
        info = json.loads(run_info_path(out).read_text(encoding="utf-8"))
        return info if isinstance(info, dict) else None
    except (OSError, ValueError):
        return None


def _part_index(name: str) -> int | None:
    if not name.startswith("part-"):
        return None
    try:
        return int(name[len("part-") :].split(".", 1)[0])
    except ValueError:
        return None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
