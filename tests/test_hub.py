"""Published-weights registry and the cached, verified, atomic download, against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner

from pvt_deploy import hub
from pvt_deploy.cli import cli
from pvt_deploy.errors import CheckpointError, DownloadError

NAME = "pvt_v2_b2_mmcr-il-all"
PAYLOAD = bytes(range(256)) * 5000  # 1.28 MB: several 1 MiB chunks


class _Server:
    """Serves ``files`` (path -> bytes); ``truncate`` sends a full Content-Length but only half the body;
    ``drip`` sends the body one byte every ``drip`` seconds; ``/loop`` redirects to itself."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.truncate = False
        self.drip: float | None = None
        self.header_drip: float | None = None  # one header line every this many seconds, 40 lines, then the file
        self.header_lines_sent = 0
        self.endless = False  # no Content-Length, and a body that never ends
        self.endless_sent = 0
        self.claimed_length: int | None = None  # a Content-Length far beyond what is sent
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                server.requests.append(self.path)
                try:
                    if server.header_drip is not None:
                        self._trickle_headers(server.files[self.path], server.header_drip)
                        return
                    if server.endless:
                        self._endless()
                        return
                    if server.claimed_length is not None:
                        self.send_response(200)
                        self.send_header("Content-Length", str(server.claimed_length))
                        self.end_headers()
                        self._endless()
                        return
                except OSError:  # the client gave up
                    return
                if self.path.startswith("/loop"):
                    self.send_response(302)
                    self.send_header("Location", self.path)
                    self.end_headers()
                    return
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404, "Not Found")
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.drip is not None:
                    self._drip(body, server.drip)
                    return
                self.wfile.write(body[: len(body) // 2] if server.truncate else body)
                self.wfile.flush()

            def _drip(self, body: bytes, every: float) -> None:
                give_up = time.monotonic() + 10  # a client without a deadline then fails instead of hanging
                try:
                    for index in range(len(body)):
                        if time.monotonic() > give_up:
                            return
                        self.wfile.write(body[index : index + 1])
                        self.wfile.flush()
                        time.sleep(every)
                except OSError:  # the client gave up
                    pass

            def _trickle_headers(self, body: bytes, every: float) -> None:
                self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                for index in range(40):
                    self.wfile.write(f"X-Slow-{index}: y\r\n".encode())
                    self.wfile.flush()
                    server.header_lines_sent += 1
                    time.sleep(every)
                self.wfile.write(f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
                self.wfile.flush()

            def _endless(self) -> None:
                if server.claimed_length is None:
                    self.send_response(200)
                    self.send_header("Connection", "close")
                    self.end_headers()
                chunk = b"\0" * 65536
                give_up = time.monotonic() + 20
                while time.monotonic() < give_up:
                    self.wfile.write(chunk)
                    server.endless_sent += len(chunk)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/models"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> _Server:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Server]:
    """A local server holding PAYLOAD as NAME.pt, with NAME's published sha256 swapped for PAYLOAD's."""
    monkeypatch.setitem(hub.PUBLISHED, NAME, replace(hub.PUBLISHED[NAME], sha256=hashlib.sha256(PAYLOAD).hexdigest()))
    monkeypatch.delenv(hub.BASE_URL_ENV, raising=False)
    monkeypatch.delenv(hub.CACHE_ENV, raising=False)
    with _Server() as srv:
        srv.files[f"/models/{NAME}.pt"] = PAYLOAD
        yield srv


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_registry_holds_the_published_b2_checkpoints() -> None:
    assert hub.PUBLISHED["pvt_v2_b2_mmcr-il-all"].resolution == (384, 384)
    assert hub.PUBLISHED["pvt_v2_b2_mmcr-il-all"].sha256 == (
        "c0ffa0feb298e40c4335347ff648fe952fb0310e4c931d79be96a6af6bcbf1eb"
    )
    assert hub.PUBLISHED["pvt_v2_b2_mmcr-il-all256px"].resolution == (256, 256)
    assert hub.PUBLISHED["pvt_v2_b2_mmcr-il-all256px"].sha256 == (
        "1b160a37d6fdd172ba21842de2d32cf2cc9524db155218a6949be81b88a70fe4"
    )
    assert {w.network for w in hub.PUBLISHED.values()} == {"pvt_v2_b2"}


def test_default_url_is_birders_and_env_overrides_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(hub.BASE_URL_ENV, raising=False)
    assert hub.url_for("pvt_v2_b2_mmcr-il-all256px") == (
        "https://huggingface.co/birder-project/pvt_v2_b2_mmcr-il-all/resolve/main/pvt_v2_b2_mmcr-il-all256px.pt"
    )
    monkeypatch.setenv(hub.BASE_URL_ENV, "http://mirror.example/w/")
    assert hub.url_for(NAME) == f"http://mirror.example/w/{NAME}.pt"
    assert hub.url_for(NAME, base_url="http://other") == f"http://other/{NAME}.pt"


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(hub.CACHE_ENV, raising=False)
    assert hub.cache_dir() == Path("~/.cache/pvt-deploy").expanduser()
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "env"))
    assert hub.cache_dir() == tmp_path / "env"
    assert hub.cache_dir(tmp_path / "arg") == tmp_path / "arg"


def test_unknown_name_is_a_download_error() -> None:
    with pytest.raises(DownloadError, match="unknown published model 'nope'"):
        hub.download("nope")


def test_download_verifies_and_caches(server: _Server, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    path = hub.download(NAME, cache_dir=cache, base_url=server.base_url, progress=False)
    assert path == cache / f"{NAME}.pt"
    assert path.read_bytes() == PAYLOAD
    assert _leftovers(cache) == [f"{NAME}.pt"]  # no temp file left behind
    again = hub.download(NAME, cache_dir=cache, base_url=server.base_url, progress=False)
    assert again == path
    assert server.requests == [f"/models/{NAME}.pt"]  # the verified cached copy was reused


def test_download_uses_env_cache_and_base_url(server: _Server, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "envcache"))
    monkeypatch.setenv(hub.BASE_URL_ENV, server.base_url)
    path = hub.download(NAME, progress=False)
    assert path == tmp_path / "envcache" / f"{NAME}.pt"
    assert path.read_bytes() == PAYLOAD


def test_sha_mismatch_deletes_the_file_and_says_expected_vs_got(server: _Server, tmp_path: Path) -> None:
    tampered = PAYLOAD[:-1] + b"\x00"
    server.files[f"/models/{NAME}.pt"] = tampered
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError) as info:
        hub.download(NAME, cache_dir=cache, base_url=server.base_url, progress=False)
    message = str(info.value)
    assert "sha256 mismatch" in message
    assert f"expected {hashlib.sha256(PAYLOAD).hexdigest()}" in message
    assert f"got {hashlib.sha256(tampered).hexdigest()}" in message
    assert _leftovers(cache) == []


def test_interrupted_download_leaves_no_file(server: _Server, tmp_path: Path) -> None:
    server.truncate = True
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError, match="interrupted"):
        hub.download(NAME, cache_dir=cache, base_url=server.base_url, progress=False)
    assert _leftovers(cache) == []


def test_http_error_and_unreachable_server(server: _Server, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="HTTP 404"):
        hub.download(NAME, cache_dir=tmp_path, base_url=server.base_url + "/missing", progress=False)
    with pytest.raises(DownloadError, match="cannot connect"):
        hub.download(NAME, cache_dir=tmp_path, base_url="http://127.0.0.1:9", progress=False, timeout=5)
    assert _leftovers(tmp_path) == []


def test_corrupted_cached_file_is_downloaded_again(server: _Server, tmp_path: Path) -> None:
    (tmp_path / f"{NAME}.pt").write_bytes(b"corrupted")
    path = hub.download(NAME, cache_dir=tmp_path, base_url=server.base_url, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert len(server.requests) == 1


def test_resolve_source(server: _Server, tmp_path: Path) -> None:
    local = tmp_path / "mine.pt"
    local.write_bytes(b"x")
    assert hub.resolve_source(local) == local
    assert hub.resolve_source(str(local)) == local
    cached = hub.resolve_source(NAME, cache_dir=tmp_path / "c", base_url=server.base_url, progress=False)
    assert cached.read_bytes() == PAYLOAD
    with pytest.raises(CheckpointError, match="not a published model name"):
        hub.resolve_source(tmp_path / "absent.pt")
    with pytest.raises(CheckpointError, match="is a folder"):
        hub.resolve_source(tmp_path)


def test_cli_download_prints_the_path(server: _Server, tmp_path: Path) -> None:
    cache = tmp_path / "cli-cache"
    result = CliRunner().invoke(cli, ["download", NAME, "--cache-dir", str(cache), "--base-url", server.base_url, "-q"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(cache / f"{NAME}.pt")
    assert (cache / f"{NAME}.pt").read_bytes() == PAYLOAD


def test_cli_download_failure_is_one_line_and_exit_code_3(server: _Server, tmp_path: Path) -> None:
    server.files.clear()
    result = CliRunner().invoke(cli, ["download", NAME, "--cache-dir", str(tmp_path), "--base-url", server.base_url])
    assert result.exit_code == DownloadError.exit_code
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "HTTP 404" in errors[0]
    assert "Traceback" not in result.output


def test_hub_and_preprocess_never_import_torch() -> None:
    code = (
        "import sys; import pvt_deploy.hub, pvt_deploy.preprocess, pvt_deploy.cli.model_cmds; "
        "bad = [m for m in ('torch', 'onnx') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_progress_line_on_a_terminal(server: _Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    hub.download(NAME, cache_dir=tmp_path, base_url=server.base_url, progress=True)
    text = terminal.getvalue()
    assert text.startswith(f"Downloading {server.base_url}/{NAME}.pt")
    assert f"\r{NAME}: 1.3/1.3 MB (100%)\n" in text


def test_no_progress_output_when_disabled(server: _Server, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    hub.download(NAME, cache_dir=tmp_path, base_url=server.base_url, progress=False)
    assert capsys.readouterr().err == ""


def test_overall_timeout_stops_a_dripping_server(server: _Server, tmp_path: Path) -> None:
    server.drip = 0.2  # each read gets a byte well within the per-read limit; only an overall deadline stops it
    started = time.monotonic()
    with pytest.raises(DownloadError, match=r"not finished within the 1\.5 s timeout \(\d+ bytes received\)"):
        hub.download(NAME, cache_dir=tmp_path, base_url=server.base_url, progress=False, timeout=1.5)
    assert time.monotonic() - started < 5
    assert _leftovers(tmp_path) == []


def test_cli_timeout_option_is_one_line(server: _Server, tmp_path: Path) -> None:
    server.drip = 0.2
    result = CliRunner().invoke(
        cli, ["download", NAME, "--cache-dir", str(tmp_path), "--base-url", server.base_url, "--timeout", "1", "-q"]
    )
    assert result.exit_code == DownloadError.exit_code
    assert result.output.count("\n") == 1 and result.output.startswith("Error: ") and "1 s timeout" in result.output
    bad = CliRunner().invoke(cli, ["download", NAME, "--cache-dir", str(tmp_path), "--timeout", "0"])
    assert bad.exit_code == 2 and "--timeout" in bad.output


@pytest.mark.parametrize("base_url", ["htp://127.0.0.1/m", "http://127.0.0.1:port/m", "http://[::1/x", "models"])
def test_malformed_base_url_is_one_error_line(base_url: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["download", NAME, "--cache-dir", str(tmp_path), "--base-url", base_url, "-q"])
    assert result.exit_code == DownloadError.exit_code, result.output
    assert result.output.count("\n") == 1, result.output
    assert result.output.startswith(f"Error: base URL {base_url!r} is malformed")
    assert _leftovers(tmp_path) == []


def test_redirect_loop_is_one_error_line(server: _Server, tmp_path: Path) -> None:
    loop = server.base_url.replace("/models", "/loop")
    result = CliRunner().invoke(cli, ["download", NAME, "--cache-dir", str(tmp_path), "--base-url", loop, "-q"])
    assert result.exit_code == DownloadError.exit_code
    assert result.output.count("\n") == 1, result.output
    assert "too many redirects" in result.output
    assert _leftovers(tmp_path) == []


def test_part_files_of_killed_downloads_are_removed_and_reported(
    server: _Server, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    killed = tmp_path / f".{NAME}.pt.part-{gone.pid}-4242"
    killed.write_bytes(PAYLOAD[:1000])
    other = tmp_path / "unrelated.part"
    other.write_bytes(b"x")
    path = hub.download(NAME, cache_dir=tmp_path, base_url=server.base_url, progress=True)
    assert path.read_bytes() == PAYLOAD
    assert _leftovers(tmp_path) == sorted([path.name, other.name])
    assert f"removed 1 leftover of interrupted runs: {killed.name}" in capsys.readouterr().err


def test_a_killed_download_leaves_a_part_file_the_next_one_removes(server: _Server, tmp_path: Path) -> None:
    server.drip = 0.05
    code = (
        "from pvt_deploy import hub; "
        f"hub.download({NAME!r}, cache_dir={str(tmp_path)!r}, base_url={server.base_url!r}, progress=False)"
    )
    child = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 30
    while not any(".part-" in name for name in _leftovers(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.05)
    child.kill()
    child.wait()
    assert [name for name in _leftovers(tmp_path) if ".part-" in name], "the child never started writing"
    server.drip = None
    path = hub.download(NAME, cache_dir=tmp_path, base_url=server.base_url, progress=False)
    assert _leftovers(tmp_path) == [path.name]


def test_trickling_headers_cannot_outlast_the_timeout(server: _Server, tmp_path: Path) -> None:
    """The deadline covers the headers too: one header line every 0.25 s never trips a per-read timeout."""
    server.header_drip = 0.25
    with pytest.raises(DownloadError, match=r"within the 1\.5 s timeout"):
        hub.download(NAME, cache_dir=tmp_path, base_url=server.base_url, progress=False, timeout=1.5)
    assert server.header_lines_sent < 40  # the client hung up mid-headers instead of reading them all
    assert _leftovers(tmp_path) == []


@pytest.fixture
def published_size(monkeypatch: pytest.MonkeyPatch) -> int:
    """NAME published at PAYLOAD's size (the registry's stated size, in MB)."""
    weights = hub.PUBLISHED[NAME]
    monkeypatch.setitem(hub.PUBLISHED, NAME, replace(weights, file_size_mb=len(PAYLOAD) / (1 << 20)))
    return len(PAYLOAD)


def test_an_endless_body_stops_near_the_published_size(server: _Server, published_size: int, tmp_path: Path) -> None:
    hub.download(NAME, cache_dir=tmp_path / "ok", base_url=server.base_url, progress=False)  # the real size passes
    server.endless = True
    with pytest.raises(DownloadError, match=r"stopped at (\d+) bytes, larger than the published size") as error:
        hub.download(NAME, cache_dir=tmp_path / "endless", base_url=server.base_url, progress=False, timeout=60)
    stopped_at = int(error.value.args[0].split("stopped at ")[1].split()[0])
    assert published_size < stopped_at <= 2 * published_size
    assert _leftovers(tmp_path / "endless") == []


def test_an_oversized_content_length_is_refused_up_front(server: _Server, published_size: int, tmp_path: Path) -> None:
    server.claimed_length = 10**15
    with pytest.raises(DownloadError, match=r"announces 1000000000000000 bytes, larger than the published size"):
        hub.download(NAME, cache_dir=tmp_path, base_url=server.base_url, progress=False, timeout=60)
    assert _leftovers(tmp_path) == []
