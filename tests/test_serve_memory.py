"""Memory by decoded size (issue 20 item 1): the decoded-memory budget, its estimates, the 16-bit conversion's
working memory, and a real server taking 8 concurrent 88-megapixel 16-bit uploads under 2 GB of RSS."""

from __future__ import annotations

import io
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from pvt_deploy.decode_budget import DecodeBudget, DecodeBusy, estimate_decoded_bytes, peak_decoded_bytes
from pvt_deploy.errors import ImageError
from pvt_deploy.preprocess import sixteen_to_eight_bit, to_rgb
from tests.test_serve import Server, start_server

GIANT_SIDE = 9400  # 88.4 Mpixel: under the 89.5 Mpixel pixel limit
CONCURRENT_UPLOADS = 8
RSS_LIMIT = 2 * 1024**3


def sixteen_bit_png(width: int, height: int) -> bytes:
    """A 16-bit gray PNG, small on the wire (mostly zeros), huge when decoded."""
    samples = np.zeros((height, width), dtype="<u2")
    samples[:: max(height // 64, 1), :] = 40_000
    buffer = io.BytesIO()
    Image.frombytes("I;16", (width, height), samples.tobytes()).save(buffer, format="PNG", compress_level=9)
    return buffer.getvalue()


def test_sixteen_bit_conversion_is_exact_in_integers() -> None:
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    reference = np.clip(np.rint(values.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(sixteen_to_eight_bit(values), reference)
    image = Image.frombytes("I;16", (256, 256), values.astype("<u2").tobytes())
    np.testing.assert_array_equal(np.asarray(to_rgb(image))[..., 0], reference)


def test_estimate_reads_the_header_and_counts_the_mode() -> None:
    data = sixteen_bit_png(640, 480)
    assert estimate_decoded_bytes(data) == peak_decoded_bytes(640, 480, "I;16")
    # 16-bit gray costs more per pixel than its sample size: stored 2 + working copies 4 + RGB 4
    assert peak_decoded_bytes(100, 100, "I;16") == 100 * 100 * 10
    assert peak_decoded_bytes(100, 100, "RGB") == 100 * 100 * 4
    assert peak_decoded_bytes(100, 100, "L") == 100 * 100 * 5
    assert estimate_decoded_bytes(b"not an image") is None


def test_budget_bounds_bytes_in_flight_across_threads() -> None:
    budget = DecodeBudget(100)
    peak = 0
    lock = threading.Lock()

    def decode(nbytes: int) -> None:
        nonlocal peak
        with budget.reserve(nbytes, timeout=30):
            with lock:
                peak = max(peak, budget.in_use)
            time.sleep(0.01)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(decode, [60, 30, 50, 40, 70, 10, 90, 20] * 3))
    assert 0 < peak <= 100 and budget.in_use == 0


def test_budget_refuses_what_can_never_fit_and_times_out_when_full() -> None:
    budget = DecodeBudget(100)
    with pytest.raises(ImageError, match="over the decoded-memory limit"), budget.reserve(101, timeout=1):
        pass
    with budget.reserve(80, timeout=1), pytest.raises(DecodeBusy), budget.reserve(30, timeout=0.05):
        pass
    with budget.reserve(100, timeout=0):  # released again: the whole budget is free
        assert budget.in_use == 100


def _ask(settings_options: dict, photo: bytes, hold_budget: bool = False) -> httpx.Response:
    """One /v1/predict to an in-process app (ASGI transport); ``hold_budget``: the whole decoded-memory budget is
    reserved by someone else for the duration."""
    import asyncio

    from pvt_deploy.runtime.config import RuntimeConfig
    from pvt_deploy.serve.app import create_app
    from pvt_deploy.serve.settings import ServeSettings

    settings = ServeSettings(runtime=RuntimeConfig(device="cpu"), **settings_options)
    app = create_app(settings.open_runtime(), settings)
    service = app.app.app.state.service  # metrics -> limits -> FastAPI

    async def ask() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://serve.test", timeout=60) as client:
            return await client.post("/v1/predict", files=[("image", ("photo.png", photo))])

    if not hold_budget:
        return asyncio.run(ask())
    with service.decode_budget.reserve(service.decode_budget.limit_bytes, timeout=0):
        return asyncio.run(ask())


def test_image_over_the_whole_budget_is_422_for_that_image(tiny_export_dir: Path) -> None:
    photo = sixteen_bit_png(640, 480)  # about 3 MB at its decoding peak
    response = _ask({"model_dir": tiny_export_dir, "max_decode_mb": 1}, photo)
    assert response.status_code == 422, response.text
    (error,) = response.json()["errors"]
    assert error["item"] == "photo.png" and "over the decoded-memory limit of 1 MB" in error["reason"]
    assert _ask({"model_dir": tiny_export_dir, "max_decode_mb": 8}, photo).status_code == 200


def test_full_budget_is_503_with_retry_after(tiny_export_dir: Path) -> None:
    response = _ask({"model_dir": tiny_export_dir, "decode_wait_s": 0.2}, sixteen_bit_png(64, 64), hold_budget=True)
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "1" and "decoded-memory budget full" in response.json()["detail"]


@pytest.fixture(scope="module")
def server(tiny_export_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("memory")
    model_dir = Path(shutil.copytree(tiny_export_dir, folder / "model"))
    running = start_server(model_dir, folder)
    yield running
    assert running.stop() == 0, "".join(running.log)


def _peak_rss(pid: int) -> int:
    """The kernel's high-water mark of the process's RSS (Linux), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.slow
def test_concurrent_giant_sixteen_bit_uploads_stay_under_2_gb(server: Server) -> None:
    psutil = pytest.importorskip("psutil")
    giant = sixteen_bit_png(GIANT_SIDE, GIANT_SIDE)
    assert len(giant) < 1024 * 1024  # small on the wire: the body limit does not stop it
    process = psutil.Process(server.process.pid)
    sampled = [process.memory_info().rss]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            sampled.append(process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start_together = threading.Barrier(CONCURRENT_UPLOADS)

    def upload(index: int) -> httpx.Response:
        start_together.wait(timeout=60)
        return httpx.post(
            f"{server.url}/v1/predict",
            files=[("image", (f"giant{index}.png", giant))],
            timeout=600,
        )

    try:
        with ThreadPoolExecutor(CONCURRENT_UPLOADS) as pool:
            answers = list(pool.map(upload, range(CONCURRENT_UPLOADS)))
    finally:
        done.set()
        sampler.join()
    statuses = sorted(answer.status_code for answer in answers)
    assert set(statuses) <= {200, 503}, [answer.text for answer in answers]
    assert 200 in statuses, "the budget must let one giant image through at a time"
    for answer in answers:
        if answer.status_code == 503:
            assert answer.headers["retry-after"] and "busy" in answer.json()["detail"]
    peak = max(max(sampled), _peak_rss(server.process.pid))
    print(f"\n8 x {GIANT_SIDE}x{GIANT_SIDE} 16-bit PNG ({len(giant)} bytes): statuses {statuses}, "
          f"server RSS {sampled[0] / 2**20:.0f} MB before, peak {peak / 2**20:.0f} MB")  # fmt: skip
    assert peak < RSS_LIMIT, f"server peak RSS {peak / 2**20:.0f} MB"
    assert server.process.poll() is None
    assert httpx.get(f"{server.url}/v2/health/live", timeout=30).json() == {"live": True}
