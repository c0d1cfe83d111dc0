"""``Runtime(..., preprocess="graph")``: feed decoded pixels to the image-input graphs (``<graph>.image.onnx``).

Python still decodes, applies the EXIF rule and maps Pillow modes to gray, RGB or RGBA pixels (what the contract
leaves to the caller); the resize, crop and normalisation run inside ONNX, exactly as a client in another language
runs them. The answers equal the Python path's (the export checks it; tests/test_export_image_graphs.py too).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from pvt_deploy.errors import ImageError, ModelDirError
from pvt_deploy.manifest import verify_files
from pvt_deploy.preprocess import apply_exif_orientation, load_image, to_rgb
from pvt_deploy.runtime.results import BatchResult, ItemLog
from pvt_deploy.runtime.sessions import create_session

if TYPE_CHECKING:
    from pvt_deploy.runtime.runtime import Runtime

IMAGE_INPUT_NAME = "image"


def image_graph_entries(manifest: Any) -> dict[str, dict[str, Any]]:
    """The manifest's ``image_graphs`` section (graph name -> {file, inputs, outputs}); empty when not exported."""
    section = manifest.get("image_graphs") or {}
    if not isinstance(section, dict):
        raise ModelDirError(f"{manifest.model_dir}: 'image_graphs' must map graph names to files")
    return section


def image_pixels(image: Image.Image, *, apply_exif: bool) -> np.ndarray:
    """Pillow image -> uint8 [H, W, 1|3|4] as the image graphs take it (alpha and gray handled in the graph)."""
    if apply_exif:
        image = apply_exif_orientation(image)
    if image.mode == "RGBA":
        return np.asarray(image, dtype=np.uint8)
    if image.mode == "L":
        return np.asarray(image, dtype=np.uint8)[:, :, None]
    return np.asarray(to_rgb(image), dtype=np.uint8)


class GraphPreprocessing:
    """The image-input graphs of one ``Runtime``, loaded on first use (checksums verified like the tensor graphs)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.entries = image_graph_entries(runtime.manifest)
        if not self.entries:
            raise ModelDirError(
                f"{runtime.model_dir}: no image-input graphs in this export (re-export with pvt-deploy >= this "
                "version, or use preprocess='python')"
            )
        for graph, entry in self.entries.items():
            name = entry.get("file") if isinstance(entry, dict) else None
            if not isinstance(name, str) or name not in runtime.manifest.files:
                raise ModelDirError(f"{runtime.model_dir}: image_graphs[{graph!r}] names no file listed in 'files'")
        self._sessions: dict[str, Any] = {}
        self._lock = threading.Lock()

    def graph_for(self, graph: str) -> str:
        if graph not in self.entries:
            raise ModelDirError(
                f"{self.runtime.model_dir}: no image-input variant of the {graph!r} graph; use preprocess='python'"
            )
        return graph

    def _session(self, graph: str):
        with self._lock:
            session = self._sessions.get(graph)
            if session is None:
                name = self.entries[self.graph_for(graph)]["file"]
                files = [name, *self.runtime.manifest.data_files()]
                verify_files(self.runtime.model_dir, self.runtime.manifest, files)
                session = create_session(
                    self.runtime.manifest.path(name), self.runtime._providers, self.runtime.threads
                )
                self._sessions[graph] = session
        return session

    def _pixels(self, item: Any) -> np.ndarray:
        if isinstance(item, np.ndarray) and np.issubdtype(item.dtype, np.floating):
            raise ImageError("preprocess='graph' takes images, not preprocessed float tensors")
        spec = self.runtime.spec
        image = load_image(item, max_pixels=spec.max_pixels, max_file_bytes=spec.max_file_bytes)
        try:
            return image_pixels(image, apply_exif=spec.apply_exif)
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            raise ImageError(f"cannot decode image ({str(exc).strip() or type(exc).__name__})") from None

    def run(self, graph: str, names: tuple[str, ...], images: Any, on_error: str) -> BatchResult[Any]:
        """Like ``Runtime._run``, one image per graph call (the image graphs take one image of any size)."""
        session = self._session(graph)
        outputs = [o.name for o in session.get_outputs()]
        missing = [name for name in names if name not in outputs]
        if missing:
            raise ModelDirError(f"{self.runtime.model_dir}: the {graph} image graph has no {', '.join(missing)} output")
        log = ItemLog()
        rows: dict[str, list[np.ndarray | None]] = {name: [] for name in names}
        for pixels in log.prepared(images, self._pixels, on_error):
            if pixels is None:
                for name in names:
                    rows[name].append(None)
                continue
            produced = session.run(list(names), {IMAGE_INPUT_NAME: pixels})
            for name, value in zip(names, produced, strict=True):
                rows[name].append(value[0])
        return log.result({name: _stack(rows[name], session, name) for name in names})


def _stack(rows: list[np.ndarray | None], session: Any, name: str) -> np.ndarray:
    """Rows in input order; failed inputs are NaN rows."""
    good = [row for row in rows if row is not None]
    if good:
        row_shape = good[0].shape
    else:
        shape = next(o.shape for o in session.get_outputs() if o.name == name)
        row_shape = tuple(d if isinstance(d, int) else 0 for d in shape[1:])
    out = np.full((len(rows), *row_shape), np.nan, dtype=np.float32)
    for index, row in enumerate(rows):
        if row is not None:
            out[index] = row
    return out
