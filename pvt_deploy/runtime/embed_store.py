"""An append-safe, resumable on-disk layout for long embedding runs (``pvt-deploy embed``).

While running, everything lives in ``<out>.partial/``::

    plan.json               the full ordered input list + the model identity, written once before any work
    chunk-000000.npy        embeddings of the inputs of chunk 0 that succeeded, in input order
    chunk-000000.json       {"start", "stop", "paths": [...one per .npy row...], "errors": [...]}; written last,
                            so a chunk counts as done only when its .json exists (every file goes tmp -> rename)

An interruption at any moment leaves whole chunks plus at most some ``*.tmp`` files, which are ignored. ``--resume``
continues at the first chunk without a ``.json``. ``finalize`` streams the chunks into
``.<out>.tmp-<pid>-<starttime>/`` (``embeddings.npy``, ``paths.txt``, ``errors.json``, ``run.json``) and renames that
folder to ``<out>`` in one step, so ``<out>`` is either absent or complete; such a folder left by a killed run is
removed by the next one (``pvt_deploy.staging``).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pvt_deploy.errors import OutputError
from pvt_deploy.staging import staging_path

PLAN_NAME = "plan.json"
EMBEDDINGS_NAME = "embeddings.npy"
PATHS_NAME = "paths.txt"
ERRORS_NAME = "errors.json"
RUN_NAME = "run.json"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_bytes(path, (json.dumps(value, indent=1) + "\n").encode("utf-8"))


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        np.save(handle, array, allow_pickle=False)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


def partial_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


@dataclass
class Chunk:
    index: int
    start: int
    stop: int
    paths: list[str]
    errors: list[dict[str, str]]


class EmbedStore:
    """The ``<out>.partial`` folder of one run."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.work = partial_dir(out)

    # --- starting / resuming --------------------------------------------------------------------------------------

    def start(self, inputs: list[str], identity: dict[str, Any], chunk_size: int) -> None:
        if self.work.exists():
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True)
        atomic_write_json(self.work / PLAN_NAME, {"inputs": inputs, "model": identity, "chunk_size": chunk_size})

    def plan(self) -> dict[str, Any]:
        try:
            plan = json.loads((self.work / PLAN_NAME).read_text(encoding="utf-8"))
            if not isinstance(plan.get("inputs"), list) or int(plan.get("chunk_size", 0)) < 1:
                raise ValueError("incomplete plan")
            return plan
        except (OSError, ValueError) as exc:
            raise OutputError(f"{self.work}: cannot resume, its {PLAN_NAME} is unreadable ({exc})") from None

    def has_plan(self) -> bool:
        return (self.work / PLAN_NAME).is_file()

    def completed_chunks(self) -> list[Chunk]:
        """Chunks 0..k-1 that are complete, in order; stops at the first incomplete one and removes what follows
        (leftovers of the interrupted chunk)."""
        chunks: list[Chunk] = []
        index = 0
        while True:
            chunk = self._read_chunk(index)
            if chunk is None:
                break
            chunks.append(chunk)
            index += 1
        for leftover in self.work.iterdir():
            if leftover.name == PLAN_NAME:
                continue
            if leftover.name.endswith(".tmp") or _chunk_index(leftover.name) not in (None, *range(index)):
                leftover.unlink(missing_ok=True)
        return chunks

    def _read_chunk(self, index: int) -> Chunk | None:
        meta_path = self.work / f"chunk-{index:06d}.json"
        npy_path = self.work / f"chunk-{index:06d}.npy"
        if not meta_path.is_file() or not npy_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            rows = np.load(npy_path, mmap_mode="r", allow_pickle=False).shape[0]
        except (OSError, ValueError):
            return None
        if rows != len(meta["paths"]):
            return None
        return Chunk(index, int(meta["start"]), int(meta["stop"]), list(meta["paths"]), list(meta["errors"]))

    # --- writing --------------------------------------------------------------------------------------------------

    def write_chunk(self, chunk: Chunk, embeddings: np.ndarray) -> None:
        if embeddings.shape[0] != len(chunk.paths):
            raise ValueError("one embedding row per successful path")
        atomic_save_npy(self.work / f"chunk-{chunk.index:06d}.npy", np.ascontiguousarray(embeddings, np.float32))
        meta = {"start": chunk.start, "stop": chunk.stop, "paths": chunk.paths, "errors": chunk.errors}
        atomic_write_json(self.work / f"chunk-{chunk.index:06d}.json", meta)

    def iter_chunk_arrays(self, chunks: list[Chunk]) -> Iterator[np.ndarray]:
        for chunk in chunks:
            yield np.load(self.work / f"chunk-{chunk.index:06d}.npy", allow_pickle=False)

    def finalize(self, chunks: list[Chunk], dim: int, run_info: dict[str, Any], overwrite: bool) -> Path:
        """Stream every chunk into ``<out>`` (one rename at the end) and remove the partial folder."""
        tmp = staging_path(self.out, "tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        total = sum(len(c.paths) for c in chunks)
        embeddings = np.lib.format.open_memmap(tmp / EMBEDDINGS_NAME, mode="w+", dtype=np.float32, shape=(total, dim))
        row = 0
        for array in self.iter_chunk_arrays(chunks):
            if array.shape[0]:
                embeddings[row : row + array.shape[0]] = array
            row += array.shape[0]
        embeddings.flush()
        del embeddings
        paths = [path for chunk in chunks for path in chunk.paths]
        errors = [error for chunk in chunks for error in chunk.errors]
        (tmp / PATHS_NAME).write_text("".join(p + "\n" for p in paths), encoding="utf-8")
        (tmp / ERRORS_NAME).write_text(json.dumps(errors, indent=1) + "\n", encoding="utf-8")
        (tmp / RUN_NAME).write_text(json.dumps({**run_info, "rows": total, "failed": len(errors)}, indent=1) + "\n")
        old = None
        if self.out.exists():
            if not overwrite:
                raise OutputError(f"{self.out} already exists; pass --overwrite to replace it")
            old = staging_path(self.out, "old")
            self.out.rename(old)
        tmp.rename(self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(self.work, ignore_errors=True)
        return self.out


def _chunk_index(name: str) -> int | None:
    if not name.startswith("chunk-"):
        return None
    try:
        return int(name[len("chunk-") :].split(".", 1)[0])
    except ValueError:
        return None
