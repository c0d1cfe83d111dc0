"""Conformance vectors: images in every Pillow mode family plus what a correct implementation must produce from
them (the resized uint8 pixels, the input tensor, the graphs' outputs), so a client in any language can test
itself against ``manifest.json``'s ``input.preprocess`` contract. Torch-free (built on ``Runtime``).

Layout of the folder written by ``write_conformance`` (raw little-endian arrays, described in ``vectors.json``)::

    README.md           how to check an implementation against the vectors
    vectors.json        per image: file, mode, and each array's file, dtype, shape; the tolerances
    images/<name>.<ext> the encoded images
    arrays/<name>.resized.u8     uint8 [h, w, 3]   after decode, mode rule, resize and crop
    arrays/<name>.input.f32      float32 [1, 3, h, w]  the tensor graphs' input
    arrays/<name>.<graph>.<output>.f32   the fp32 graphs' outputs for that input

``check_client`` runs any client program on every vector image and compares its answer with the expected outputs:
the client is a command template with ``{image}`` where the image path goes, and prints one JSON object on
stdout, ``{"probabilities": [...]}`` (all classes, index order) plus, optionally, ``"embedding": [...]``.
"""

from __future__ import annotations

import io
import json
import math
import shlex
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageCms

from pvt_deploy.errors import OutputError
from pvt_deploy.preprocess import load_image, resize_and_crop, to_rgb

VECTORS_NAME = "vectors.json"
TOLERANCES = {
    "resized": {"min_equal_fraction": 0.99, "max_levels": 1},
    "input": {"max_abs": 1e-6},
    "probabilities": {"max_abs": 1e-4},
    "embedding": {"min_cosine": 0.99999},
}
GRAPH_OUTPUTS = {"classify": ("probabilities", "embedding"), "embed": ("embedding",)}


def conformance_images(seed: int = 11) -> dict[str, tuple[str, bytes]]:
    """name -> (file name, encoded bytes): RGB, RGBA, palette with transparency, gray, 16-bit gray, ICC JPEG."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:90, 0:130]
    smooth = np.stack([(x * 2) % 256, (y * 3) % 256, ((x + y) * 5) % 256], axis=-1).astype(np.uint8)
    noisy = np.clip(smooth.astype(int) + rng.integers(-40, 41, smooth.shape), 0, 255).astype(np.uint8)
    rgb = Image.fromarray(noisy)
    alpha = (x * 255 // 129).astype(np.uint8)
    rgba = Image.fromarray(np.dstack([noisy, alpha]), mode="RGBA")
    palette = rgb.quantize(64)
    palette.info["transparency"] = 5
    gray = rgb.convert("L")
    gray16 = Image.fromarray(
        (np.asarray(gray, np.uint16) * 257 + rng.integers(0, 257, gray.size[::-1])).astype(np.uint16)
    )
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    encoded = {}
    for name, image, fmt, extra in (
        ("rgb", rgb, "PNG", {}),
        ("rgba", rgba, "PNG", {}),
        ("palette", palette, "PNG", {"transparency": 5}),
        ("gray", gray, "PNG", {}),
        ("gray16", gray16, "PNG", {}),
        ("icc", Image.fromarray(smooth), "JPEG", {"quality": 90, "icc_profile": icc}),
        ("tall", Image.fromarray(noisy.transpose(1, 0, 2).copy()), "PNG", {}),
    ):
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **extra)
        encoded[name] = (f"{name}.{'jpg' if fmt == 'JPEG' else 'png'}", buffer.getvalue())
    return encoded


def _write_array(folder: Path, name: str, array: np.ndarray) -> dict[str, Any]:
    array = np.ascontiguousarray(array)
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    (folder / name).write_bytes(little.tobytes())
    return {"file": f"arrays/{name}", "dtype": str(array.dtype), "shape": list(array.shape)}


def write_conformance(model_dir: Path, out_dir: Path, *, force: bool = False) -> dict[str, Any]:
    """Write the vectors of the export at ``model_dir`` into ``out_dir`` (staged, renamed into place at the end)."""
    from pvt_deploy.runtime.runtime import Runtime

    runtime = Runtime(model_dir)
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise OutputError(f"{out_dir} already exists; pass --force to replace it")
    staging = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "images").mkdir(parents=True)
    (staging / "arrays").mkdir()
    spec = runtime.spec
    entries = []
    try:
        for name, (file_name, data) in conformance_images().items():
            (staging / "images" / file_name).write_bytes(data)
            image = load_image(data)
            resized = np.asarray(resize_and_crop(to_rgb(image), spec.size, spec.center_crop), dtype=np.uint8)
            tensor = runtime.preprocess(data)
            entry: dict[str, Any] = {
                "name": name,
                "image": f"images/{file_name}",
                "pillow_mode": image.mode,
                "icc_profile": "icc_profile" in image.info,
                "resized": _write_array(staging / "arrays", f"{name}.resized.u8", resized),
                "input": _write_array(staging / "arrays", f"{name}.input.f32", tensor),
                "outputs": {},
            }
            for graph, names in GRAPH_OUTPUTS.items():
                if graph not in runtime.graphs:
                    continue
                produced = runtime.session(graph).run(tensor, names)
                entry["outputs"][graph] = {
                    output: _write_array(staging / "arrays", f"{name}.{graph}.{output}.f32", produced[output])
                    for output in names
                }
            entries.append(entry)
        document = {
            "model_name": runtime.manifest.model_name,
            "contract": runtime.describe()["preprocess"],
            "tolerances": TOLERANCES,
            "vectors": entries,
        }
        (staging / VECTORS_NAME).write_text(json.dumps(document, indent=1) + "\n")
        (staging / "README.md").write_text(README)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return document


IMAGE_PLACEHOLDER = "{image}"
CLIENT_OUTPUT = 'one JSON object on stdout: {"probabilities": [one per class, index order], "embedding": [optional]}'


@dataclass(frozen=True)
class VectorCheck:
    """One vector's verdict: the measured differences (``None`` where not measured) and why it failed, if it did."""

    name: str
    probabilities_max_abs: float | None = None
    embedding_cosine: float | None = None
    problem: str | None = None

    @property
    def passed(self) -> bool:
        return self.problem is None


def read_vectors(vectors_dir: Path) -> dict[str, Any]:
    """``vectors.json`` of a folder ``write_conformance`` wrote; ``ValueError`` says what is wrong with it."""
    path = Path(vectors_dir) / VECTORS_NAME
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        hint = "write one with `pvt-deploy conformance MODEL_DIR --out DIR`"
        raise ValueError(f"{vectors_dir}: no {VECTORS_NAME} ({hint})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable ({exc})") from None
    if not isinstance(document, dict) or not isinstance(document.get("vectors"), list) or not document["vectors"]:
        raise ValueError(f"{path}: no vectors listed")
    return document


def client_command(template: str, image: Path) -> list[str]:
    """The argv for one image: ``template`` split as a POSIX shell would (no shell runs it), ``{image}`` replaced
    in every word that holds it. A template without ``{image}`` gets the path as its last argument."""
    words = shlex.split(template)
    if not words:
        raise ValueError("the client command is empty")
    if not any(IMAGE_PLACEHOLDER in word for word in words):
        return [*words, str(image)]
    return [word.replace(IMAGE_PLACEHOLDER, str(image)) for word in words]


def _expected(vectors_dir: Path, record: dict[str, Any]) -> np.ndarray:
    dtype = np.dtype(record["dtype"]).newbyteorder("<")
    return np.fromfile(vectors_dir / record["file"], dtype=dtype).reshape(record["shape"]).astype(np.float64)


def _parse_answer(stdout: str) -> dict[str, Any]:
    """The last non-empty stdout line as the client's JSON object (clients may log lines before it)."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines:
        raise ValueError("printed nothing on stdout")
    try:
        answer = json.loads(lines[-1])
    except json.JSONDecodeError:
        raise ValueError(f"last stdout line is not JSON: {lines[-1][:60]!r}") from None
    if not isinstance(answer, dict) or "probabilities" not in answer:
        raise ValueError("JSON without 'probabilities'")
    return answer


def judge_answer(
    vectors_dir: Path, vector: dict[str, Any], answer: dict[str, Any], tolerances: dict[str, Any]
) -> VectorCheck:
    """Compare one client answer with a vector's expected classify outputs, within the folder's tolerances."""
    expected = vector["outputs"]["classify"]
    want = _expected(vectors_dir, expected["probabilities"]).reshape(-1)
    try:
        got = np.asarray(answer["probabilities"], dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        return VectorCheck(vector["name"], problem="'probabilities' is not a list of numbers")
    if got.shape != want.shape:
        return VectorCheck(vector["name"], problem=f"{got.size} probabilities, expected {want.size}")
    max_abs = float(np.abs(got - want).max())
    limit = tolerances["probabilities"]["max_abs"]
    problems = [] if max_abs <= limit else [f"probabilities differ by {max_abs:.2e} > {limit:g}"]
    cosine = None
    if answer.get("embedding") is not None and "embedding" in expected:
        want_embedding = _expected(vectors_dir, expected["embedding"]).reshape(-1)
        try:
            embedding = np.asarray(answer["embedding"], dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            embedding = np.zeros(0)
        if embedding.shape != want_embedding.shape:
            problems.append(f"embedding has {embedding.size} values, expected {want_embedding.size}")
        else:
            norms = float(np.linalg.norm(embedding) * np.linalg.norm(want_embedding))
            cosine = float(embedding @ want_embedding / norms) if norms > 0 else 0.0
            minimum = tolerances["embedding"]["min_cosine"]
            if not cosine >= minimum:
                problems.append(f"embedding cosine {cosine:.8f} < {minimum}")
    if not math.isfinite(max_abs):
        problems.insert(0, "probabilities are not finite")
    return VectorCheck(vector["name"], max_abs, cosine, "; ".join(problems) or None)


def check_client(
    vectors_dir: Path,
    client: str,
    *,
    timeout: float = 120.0,
    cwd: Path | None = None,
    progress: Callable[[VectorCheck], None] | None = None,
) -> list[VectorCheck]:
    """Run the ``client`` command template on every vector image and judge each answer (see the module doc).

    A client that exits non-zero, times out or prints no usable JSON fails that vector, with the first line of
    its stderr as the reason; the other vectors still run."""
    vectors_dir = Path(vectors_dir).resolve()
    document = read_vectors(vectors_dir)
    checks = []
    for vector in document["vectors"]:
        argv = client_command(client, vectors_dir / vector["image"])
        try:
            completed = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=cwd, check=False)
        except FileNotFoundError:
            check = VectorCheck(vector["name"], problem=f"cannot run {argv[0]!r}: no such program")
        except subprocess.TimeoutExpired:
            check = VectorCheck(vector["name"], problem=f"no answer within {timeout:g} s")
        else:
            if completed.returncode != 0:
                said = next((line for line in completed.stderr.splitlines() if line.strip()), "")
                check = VectorCheck(vector["name"], problem=f"client exit {completed.returncode}: {said[:120]}")
            else:
                try:
                    answer = _parse_answer(completed.stdout)
                except ValueError as exc:
                    check = VectorCheck(vector["name"], problem=f"client {exc}")
                else:
                    check = judge_answer(vectors_dir, vector, answer, document["tolerances"])
        checks.append(check)
        if progress is not None:
            progress(check)
    return checks


def format_checks(checks: list[VectorCheck], tolerances: dict[str, Any]) -> str:
    """The pass/fail table ``conformance --check`` prints, limits in the header."""
    header = (
        f"{'vector':10s}  {'probabilities':>13s}  {'embedding':>11s}  status   "
        f"(max abs <= {tolerances['probabilities']['max_abs']:g}, cosine >= {tolerances['embedding']['min_cosine']})"
    )
    rows = [header]
    for check in checks:
        difference = "-" if check.probabilities_max_abs is None else f"{check.probabilities_max_abs:.2e}"
        cosine = "-" if check.embedding_cosine is None else f"{check.embedding_cosine:.8f}"
        status = "ok" if check.passed else f"FAIL: {check.problem}"
        rows.append(f"{check.name:10s}  {difference:>13s}  {cosine:>11s}  {status}")
    return "\n".join(rows)


README = """# pvt-deploy conformance vectors

Test an implementation of the preprocessing contract (`manifest.json` -> `input.preprocess`) and of the graphs
in any language. `vectors.json` lists, per image in `images/`, raw little-endian arrays in `arrays/` with their
dtype and shape, and the tolerances.

For every vector:

1. Decode `image` to its stored samples: no ICC conversion (`icc.jpg` carries a profile to catch decoders
   that apply it), no EXIF rotation unless `contract.exif.apply_orientation` is true.
2. Apply the mode rule of `contract.modes` (alpha dropped, palette looked up, 16-bit gray `round(v / 257)`,
   gray replicated), then the resize of `contract.resize` and the crop of `contract.center_crop`: compare with
   `resized` (uint8 [h, w, 3]): at least `min_equal_fraction` of the values equal, none more than `max_levels`
   apart (this implementation: all equal).
3. Scale and normalise (`contract.to_float`, `contract.normalize`) into float32 NCHW: compare with `input`
   (max abs difference `input.max_abs`).
4. Run `classify.onnx` / `embed.onnx` on your tensor (or `classify.image.onnx` / `embed.image.onnx` on your
   decoded uint8 [H, W, C] pixels) and compare with `outputs`: probabilities within `probabilities.max_abs`,
   embeddings with cosine similarity at least `embedding.min_cosine`.

Or let pvt-deploy run your client on every vector and print a pass/fail table (exit 7 if one fails):

    pvt-deploy conformance --check DIR --client 'node my_client.mjs MODEL_DIR {image}'

`{image}` is replaced by each image's path; the client prints one JSON object on stdout,
`{"probabilities": [...]}` (every class, index order), optionally with `"embedding": [...]`.

Re-create with `pvt-deploy conformance MODEL_DIR --out DIR`; `tests/test_conformance.py` re-checks a written
folder against Python and the image-input graphs.
"""
