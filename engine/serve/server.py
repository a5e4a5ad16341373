"""`glyph-engine serve`: start (or join) Ray, run the deployment, and stop cleanly on a signal.

On SIGTERM or SIGINT the application is deleted first: Ray Serve stops routing to its
replicas and lets each finish the requests it holds (up to `DRAIN_S`), then everything
this command started is stopped (Serve and the local Ray, or only the application on a
cluster that was already running), within 30 s in all.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

from glyph_engine.errors import GlyphEngineError
from glyph_engine.ray_cluster import first_line, is_loopback, ray_init
from glyph_engine.serve.batcher import BatchConfig
from glyph_engine.session import ModelSource
from glyph_engine.settings import GenerationSettings

logger = logging.getLogger(__name__)

APP_NAME = "glyph-engine"
TOKEN_ENV = "GLYPH_ENGINE_TOKEN"
DRAIN_S = 20  # a replica's grace to finish its requests; Ray's and Serve's own stop take the rest of 30 s
STOP_DEADLINE_S = 25  # from the signal to this process's end, whatever happens
REQUEST_TIMEOUT_S = 300  # a request still unanswered after this gets Serve's timeout reply, never hangs
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "glyph_engine.serve.api.proxy_middlewares"
KEEP_ALIVE_S = 5  # an idle connection is closed after this (Serve's default, 90 s, lets idle clients pile up)


@dataclass(frozen=True)
class ServeOptions:
    source: ModelSource
    batch: BatchConfig
    host: str = "127.0.0.1"
    port: int = 8000
    address: str | None = None  # an existing Ray cluster; None: a local Ray in this process
    replicas: int = 1
    max_replicas: int | None = None  # set: autoscale between `replicas` and this
    num_gpus: float = 0.0  # per replica
    num_cpus: float | None = None  # per replica; None: this machine's cores / replicas (local Ray)
    token: str | None = None
    insecure: bool = False
    metrics_port: int = 8080  # local Ray's Prometheus endpoint
    settings: GenerationSettings = GenerationSettings()  # how replicas sample; requests set steps and guidance

    def check(self) -> None:
        self.settings.validate()
        if self.token is None and not is_loopback(self.host) and not self.insecure:
            raise GlyphEngineError(
                f"--host {self.host} accepts connections from other machines, and no token is set; pass --token "
                f"(or set ${TOKEN_ENV}) so requests need it, or --insecure to serve without one."
            )
        if self.token is not None and len(self.token) < 16:
            raise GlyphEngineError("--token must be at least 16 characters; e.g. `openssl rand -hex 16` makes one.")
        # Clients send it in an HTTP header, which carries ASCII only: any other token locks every client out.
        if self.token is not None and not (self.token.isascii() and self.token.isprintable() and " " not in self.token):
            raise GlyphEngineError(
                "--token must be printable ASCII without spaces (HTTP headers carry no other characters); "
                "e.g. `openssl rand -hex 16` makes one."
            )
        for name, port in (("--port", self.port), ("--metrics-port", self.metrics_port)):
            if not 1 <= port <= 65535:
                raise GlyphEngineError(f"{name} must be from 1 to 65535 (got {port}).")
        if self.replicas < 1 or (self.max_replicas is not None and self.max_replicas < self.replicas):
            raise GlyphEngineError("--replicas must be at least 1, and --max-replicas at least --replicas.")
        if self.num_gpus < 0 or (self.num_cpus is not None and self.num_cpus <= 0):
            raise GlyphEngineError("--num-gpus must be 0 or more, and --num-cpus more than 0.")
        batch = self.batch
        if batch.max_batch_images < 1 or batch.wait_s < 0 or batch.max_queued_images < 1:
            raise GlyphEngineError(
                "--max-batch-size and --max-queue must be at least 1, and --batch-wait-ms 0 or more."
            )
        self.source.check()


def _deployment_options(options: ServeOptions) -> dict[str, object]:
    num_cpus = options.num_cpus or max(1, (os.cpu_count() or 1) // options.replicas)
    scaling: dict[str, object] = (
        {
            "autoscaling_config": {
                "min_replicas": options.replicas,
                "max_replicas": options.max_replicas,
                # A replica keeps one full sampling run busy per this many single-image requests.
                "target_ongoing_requests": options.batch.max_batch_images,
            }
        }
        if options.max_replicas is not None
        else {"num_replicas": options.replicas}
    )
    return {
        **scaling,
        # Requests reach the replica's own queue, which is bounded in images and answers 503;
        # Serve's queue in front of it only catches what a replica cannot take.
        "max_ongoing_requests": options.batch.max_queued_images + options.batch.max_batch_images,
        "max_queued_requests": options.batch.max_queued_images,
        "graceful_shutdown_timeout_s": DRAIN_S,
        "graceful_shutdown_wait_loop_s": 0.5,
        "health_check_period_s": 2,
        "ray_actor_options": {"num_cpus": num_cpus, "num_gpus": options.num_gpus},
    }


def run_serve(options: ServeOptions, report: Callable[[str], None]) -> None:
    """Serves until SIGTERM or SIGINT, then drains and stops what it started."""
    options.check()
    try:
        import ray
        from ray import serve
    except ImportError:
        raise GlyphEngineError("serving needs Ray Serve: pip install 'glyph-engine[serve]'.") from None
    from glyph_engine.serve.deployment import GlyphServer
    from glyph_engine.serve.service import ReplicaConfig

    stop = threading.Event()
    local = options.address is None
    if local:  # a clear error now rather than a failed proxy after Ray started
        _check_free(options.host, options.port, "--port")
        _check_free("127.0.0.1", options.metrics_port, "--metrics-port")
    ray_init(options.address, options.metrics_port)
    # After ray.init, which installs handlers of its own that would end this process at once.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        report("starting the model server (the first start on this machine compiles the model)")
        try:
            serve.start(
                http_options={
                    "host": options.host,
                    "port": options.port,
                    "request_timeout_s": REQUEST_TIMEOUT_S,
                    "keep_alive_timeout_s": KEEP_ALIVE_S,
                },
                # The proxy reads this at start, and inherits the controller's environment. It is
                # the one way left to run code in Serve's proxy, before any replica is involved:
                # slow bodies are read there, and the proxy's own errors become JSON.
                controller_options={"runtime_env": {"env_vars": {PROXY_CALLBACK_ENV: PROXY_CALLBACK}}},
            )
        except Exception as e:  # noqa: BLE001 - Ray wraps the proxy's error
            raise GlyphEngineError(f"Ray Serve could not start its HTTP proxy: {first_line(e)}") from None
        app = GlyphServer.options(**_deployment_options(options)).bind(
            ReplicaConfig(source=options.source, batch=options.batch, token=options.token, settings=options.settings)
        )
        try:
            serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        except Exception as e:  # noqa: BLE001 - Ray wraps the replica's error; its message is what the user needs
            raise GlyphEngineError(f"the model server did not start: {first_line(e)}") from None
        url = f"http://{options.host}:{options.port}"
        report(f"serving on {url}: a page at {url}/, POST /generate, OpenAI images API at /v1, docs at /docs")
        if local:
            report(f"metrics (Prometheus): http://127.0.0.1:{options.metrics_port}/metrics")
        report("stop with Ctrl-C or SIGTERM")
        while not stop.wait(0.5):
            pass
        report("draining: finishing in-flight requests")
        _start_watchdog(STOP_DEADLINE_S)
        serve.delete(APP_NAME)
        if local:
            serve.shutdown()
    finally:
        ray.shutdown()
    report("stopped")


def _check_free(host: str, port: int, option: str) -> None:
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.bind((host, port))
    except OSError as e:
        raise GlyphEngineError(
            f"cannot listen on {host}:{port} ({e.strerror}); another process may use it: pick another {option}."
        ) from None


def _start_watchdog(seconds: float) -> None:
    """Ends this process and every process it started if stopping takes over `seconds`.

    A signal sent to the whole process group (`timeout`, `kill -TERM -PGID`) also reaches the
    local Ray's own processes, which Ray shields from SIGINT only; Ray's shutdown then waits a
    minute for a GCS that is gone. This keeps the promise of a stop within 30 s regardless.
    """

    def expire() -> None:
        import psutil

        logger.warning("stopping took over %.0f s; killing what is left", seconds)
        for child in psutil.Process().children(recursive=True):
            try:
                child.kill()
            except psutil.Error:
                pass
        os._exit(1)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
