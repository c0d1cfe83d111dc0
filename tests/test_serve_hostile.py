"""The service under hostile connections and misuse, over real sockets on 127.0.0.1 (issue 20).

Slowloris (hundreds of half-sent headers) must not lock out the health probe, and the server closes them after
``--header-timeout-s``; a stalled body is closed after ``--body-timeout-s``; a key sent in the query string never
reaches the access log; a busy port or a bad host is one ``Error:`` line with exit 13, before the model loads."""

from __future__ import annotations

import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pvt_deploy.errors import ServiceStartError
from tests.test_serve import Server, run_serve, start_server

HALF_OPEN = 400
TIMEOUT_S = 2
WAIT_FOR_CLOSE_S = 60  # far above the 2 s deadline: a bound on the test, not a speed assertion


@pytest.fixture(scope="module")
def server(tiny_export_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("hostile")
    model_dir = Path(shutil.copytree(tiny_export_dir, folder / "model"))
    # --max-queue 4: uvicorn's connection cap is 4 x 4 + 64 = 80, far below the half-open sockets sent
    options = ["--max-queue", "4", "--header-timeout-s", str(TIMEOUT_S), "--body-timeout-s", str(TIMEOUT_S)]
    with (folder / "access.log").open("w") as access_log:
        running = start_server(model_dir, folder, *options, stdout=access_log)
        running.access_log = folder / "access.log"  # type: ignore[attr-defined]
        yield running
        assert running.stop() == 0, "".join(running.log)


def _address(server: Server) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").split(":")
    return host, int(port)


def _closed_by_server(connection: socket.socket, deadline: float) -> bool:
    """True once the server has closed the connection (EOF or reset), False if it still holds it at ``deadline``."""
    connection.settimeout(max(deadline - time.monotonic(), 0.01))
    try:
        while connection.recv(4096):
            pass  # an error answer before the close is fine
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_half_open_connections_do_not_lock_out_health(server: Server) -> None:
    sockets = []
    try:
        for _ in range(HALF_OPEN):
            connection = socket.create_connection(_address(server), timeout=10)
            connection.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
            sockets.append(connection)
        live = httpx.get(f"{server.url}/v2/health/live", timeout=30)
        assert live.status_code == 200 and live.json() == {"live": True}
        deadline = time.monotonic() + WAIT_FOR_CLOSE_S
        held = sum(not _closed_by_server(connection, deadline) for connection in sockets)
        assert held == 0, f"{held} of {HALF_OPEN} half-sent requests still held"
    finally:
        for connection in sockets:
            connection.close()
    assert httpx.get(f"{server.url}/v2/health/ready", timeout=30).status_code == 200


def test_stalled_body_is_closed(server: Server) -> None:
    with socket.create_connection(_address(server), timeout=10) as connection:
        connection.sendall(
            b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
            + b"\x89PNG"
        )
        assert _closed_by_server(connection, time.monotonic() + WAIT_FOR_CLOSE_S)
    assert httpx.get(f"{server.url}/v2/health/live", timeout=30).status_code == 200


def test_oversized_headers_are_refused(server: Server) -> None:
    with socket.create_connection(_address(server), timeout=10) as connection:
        connection.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 200_000 + b"\r\n")
        connection.settimeout(30)
        answer = b""
        try:
            while chunk := connection.recv(4096):
                answer += chunk
        except ConnectionResetError:
            pass
    assert answer.startswith(b"HTTP/1.1 431") or answer == b""


def test_a_key_in_the_query_string_is_not_logged(server: Server) -> None:
    secret = "s3cret-in-the-query"
    response = httpx.get(f"{server.url}/v2/health/live?api_key={secret}&x=1", timeout=30)
    assert response.status_code == 200
    log: Path = server.access_log  # type: ignore[attr-defined]
    deadline = time.monotonic() + 30
    while '"GET /v2/health/live HTTP/1.1" 200' not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.1)
    assert secret not in log.read_text() and secret not in "".join(server.log)


def test_busy_port_is_one_error_line_before_loading(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # the folder does not exist: the port is checked first, so the answer is about the port (not exit 5)
        done = run_serve([str(tmp_path / "no-such-model"), "--port", str(port)], tmp_path)
    assert done.returncode == ServiceStartError.exit_code, done.stderr
    assert done.stderr.strip() == f"Error: cannot listen on 127.0.0.1:{port}: Address already in use"


def test_host_not_on_this_machine_is_one_error_line(tmp_path: Path) -> None:
    done = run_serve([str(tmp_path / "no-such-model"), "--host", "203.0.113.7", "--port", "0"], tmp_path)
    assert done.returncode == ServiceStartError.exit_code, done.stderr
    assert done.stderr.strip().startswith("Error: cannot listen on 203.0.113.7:0: ")
    assert len(done.stderr.strip().splitlines()) == 1


def test_threads_above_the_cpu_bound_is_one_error_line(tmp_path: Path) -> None:
    done = run_serve([str(tmp_path / "no-such-model"), "--threads", "100000"], tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().startswith("Error: --threads must be <= ")  # as predict/embed/features say it
    assert len(done.stderr.strip().splitlines()) == 1
