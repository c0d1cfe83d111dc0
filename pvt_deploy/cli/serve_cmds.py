"""``pvt-deploy serve``: the HTTP inference service (uvicorn in this process, or Ray Serve replicas).

Exit codes: 0 after a clean stop (SIGTERM drains in-flight requests first); 2 bad options (click, ``--threads``
above the CPU bound, or ``--api-key-env`` naming an unset variable); 5 (``ModelDirError``) the folder is missing or
fails its checksums; 10 (``DeviceError``) CUDA was asked for and is not usable; 13 (``ServiceStartError``) the
address cannot be listened on (port in use, bad host), checked before the model is loaded.
"""

from __future__ import annotations

import importlib.util
import signal
import socket
from pathlib import Path

import click

from pvt_deploy.cli import missing_extra, runtime_config
from pvt_deploy.decode_budget import DEFAULT_DECODE_BUDGET_BYTES, MB
from pvt_deploy.errors import ServiceStartError
from pvt_deploy.runtime.sessions import DEVICES
from pvt_deploy.serve.settings import ServeSettings

GRACEFUL_SHUTDOWN_S = 30
"""How long SIGTERM waits for in-flight requests before closing their connections."""

SERVE_MODULES = ("fastapi", "uvicorn", "httptools", "multipart", "prometheus_client", "swagger_ui_bundle")


@click.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on (0.0.0.0: all).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--providers", default=None, metavar="NAME[,NAME]",
              help="onnxruntime execution providers in order (overrides --device).")  # fmt: skip
@click.option("--precision", default="fp32", show_default=True, help="An exported precision (fp32, int8...).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="onnxruntime intra-op threads.")
@click.option("--spin-wait", is_flag=True,
              help="Pool threads spin between ops (with --threads > 1 on a machine left to the service).")  # fmt: skip
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Most images gathered into one model call (the Runtime's batch size).")  # fmt: skip
@click.option("--max-wait-ms", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="Longest a request waits for others to share its batch.")  # fmt: skip
@click.option("--max-body-mb", type=click.FloatRange(min=0, min_open=True), default=32.0, show_default=True,
              help="Larger request bodies get 413.")  # fmt: skip
@click.option("--max-queue", type=click.IntRange(min=1), default=64, show_default=True,
              help="Images admitted at once; beyond that, 503 with Retry-After.")  # fmt: skip
@click.option("--max-decode-mb", type=click.FloatRange(min=1), default=DEFAULT_DECODE_BUDGET_BYTES / MB,
              show_default=True, help="Decoded image memory in flight; beyond it decodes wait, then 503.")  # fmt: skip
@click.option("--header-timeout-s", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              help="A connection that has not sent complete headers by then is closed.")  # fmt: skip
@click.option("--body-timeout-s", type=click.FloatRange(min=0, min_open=True), default=120.0, show_default=True,
              help="A request whose body has not arrived this long after its headers is closed.")  # fmt: skip
@click.option("--api-key-env", metavar="VAR", default=None,
              help="Require 'Authorization: Bearer <key>', the key read from environment variable VAR.")  # fmt: skip
# hook: gRPC and model instances (pvt_deploy/serve/grpc_service.py, instances.py)
@click.option("--grpc-port", type=click.IntRange(0, 65535), default=None,
              help="Also serve the Open Inference Protocol over gRPC on this port (0: a free one).")  # fmt: skip
@click.option("--instances", type=click.IntRange(min=1), default=None,
              help="Batches in the model at once, on shared sessions [default: CPUs // --threads].")  # fmt: skip
@click.option("--ray", "use_ray", is_flag=True, help="Deploy on Ray Serve instead of one uvicorn process.")
@click.option("--address", default=None, help="With --ray: the Ray cluster to join (default: start a local one).")
@click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True,
              help="With --ray: replicas, each holding its own Runtime.")  # fmt: skip
def serve(
    model_dir: Path,
    host: str,
    port: int,
    device: str,
    providers: str | None,
    precision: str,
    threads: int | None,
    spin_wait: bool,
    max_batch: int,
    max_wait_ms: float,
    max_body_mb: float,
    max_queue: int,
    max_decode_mb: float,
    header_timeout_s: float,
    body_timeout_s: float,
    api_key_env: str | None,
    grpc_port: int | None,
    instances: int | None,
    use_ray: bool,
    address: str | None,
    replicas: int,
) -> None:
    """Serve MODEL_DIR over HTTP: /v1 JSON endpoints, KServe v2 /v2, /metrics, a web page at /, docs at /docs."""
    if not use_ray and (address is not None or replicas != 1):
        raise click.UsageError("--address and --replicas need --ray")
    if grpc_port is not None and grpc_port == port != 0:
        raise click.UsageError("--grpc-port must differ from --port")
    if use_ray and instances is not None:
        raise click.UsageError("--instances is for one uvicorn process; with --ray use --replicas")
    if not use_ray:
        from pvt_deploy.serve.instances import serve_threads

        threads = serve_threads(threads, instances)  # neither given: one single-threaded instance per CPU
    runtime = runtime_config(
        {"batch_size": "--max-batch"},
        device=device,
        precision=precision,
        threads=threads,
        spin_wait=spin_wait,
        batch_size=max_batch,
        providers=tuple(p.strip() for p in providers.split(",") if p.strip()) if providers else None,
    )
    settings = ServeSettings(
        model_dir=model_dir,
        runtime=runtime,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        max_body_mb=max_body_mb,
        max_queue=max_queue,
        max_decode_mb=max_decode_mb,
        header_timeout_s=header_timeout_s,
        body_timeout_s=body_timeout_s,
        api_key=ServeSettings.api_key_from_env(api_key_env),
        grpc_address=None if grpc_port is None else f"[{host}]:{grpc_port}" if ":" in host else f"{host}:{grpc_port}",
        instances=instances,
    )
    _require(SERVE_MODULES)
    if grpc_port is not None:
        _require(("grpc",))
        if grpc_port != 0:  # grpcio binds it once the app starts; a port in use is said now, before the load
            bind_listener(host, grpc_port, option=f"--grpc-port {grpc_port}: ").close()
    listener = bind_listener(host, port)  # before the model loads: a busy port costs no load and says so
    if use_ray:
        _require(("ray",))
        listener.close()  # Ray Serve's proxy binds it itself
        from pvt_deploy.serve.ray_app import run_on_ray

        run_on_ray(settings, host=host, port=port, address=address, replicas=replicas, grpc_port=grpc_port)
        return
    _serve_locally(settings, listener, host)


def bind_listener(host: str, port: int, *, option: str = "") -> socket.socket:
    """A socket bound to ``host:port`` (uvicorn listens on it), or one ``ServiceStartError`` line saying why not
    (``option`` opens it, naming the option whose port it is)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise ServiceStartError(f"--host {host}: not a usable address ({exc})") from None
    listener = socket.socket(family, kind, proto)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
    except OSError as exc:
        listener.close()
        reason = exc.strerror or str(exc)
        raise ServiceStartError(f"{option}cannot listen on {host}:{port}: {reason}") from None
    listener.set_inheritable(True)
    return listener


def _require(modules: tuple[str, ...]) -> None:
    """Checked up front (python-multipart would only fail once the app is built): one line naming the extra."""
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except ImportError:
            found = False
        if not found:
            raise missing_extra("serve", ModuleNotFoundError(f"No module named {module!r}", name=module))


def _serve_locally(settings: ServeSettings, listener: socket.socket, host: str) -> None:
    import uvicorn

    from pvt_deploy.serve.app import create_app
    from pvt_deploy.serve.protocol import DeadlineHttpToolsProtocol, install_access_log_filter

    runtime = settings.open_runtime()
    app = create_app(runtime, settings)
    config = uvicorn.Config(
        app,
        host=host,
        port=listener.getsockname()[1],
        http=DeadlineHttpToolsProtocol.configure(settings.header_timeout_s, settings.body_timeout_s),
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        # a backstop above --max-queue: connections beyond it get uvicorn's own 503 before any body is read
        # (health probes excepted, see protocol.py)
        limit_concurrency=4 * settings.max_queue + 64,
        log_level="info",
    )
    install_access_log_filter()

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if sockets and not self.should_exit:  # uvicorn logs "running on" only for sockets it bound itself
                self._log_started_message(sockets)

    # uvicorn re-raises the SIGTERM it handled once it has drained; a no-op handler makes that a clean exit 0
    signal.signal(signal.SIGTERM, lambda *_: None)
    Server(config).run(sockets=[listener])
