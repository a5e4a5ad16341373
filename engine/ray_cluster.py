"""Starting or joining Ray, shared by `serve` and bulk generation.

A Ray that glyph-engine starts itself is private to this machine: every process of it
listens on loopback only, and its control plane requires a token. Ray's servers run code
for whoever can reach them (the job agent runs shell commands), so a local Ray that
listened on the network, or answered without a token, would hand the machine to anyone
on it. Joining an existing cluster (`address`) leaves its network and authentication to
its operator (README: *On a cluster*).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets

from glyph_engine.errors import GlyphEngineError

# Token authentication arrived in Ray 2.52 and is on by default for a local `ray.init()`
# from 2.59; older releases start a Ray whose job agent runs anyone's commands. 2.60 is the
# release serve's proxy hooks are tested with (pyproject's requirement).
MIN_RAY_VERSION = (2, 60)
AUTH_MODE_ENV = "RAY_AUTH_MODE"
AUTH_TOKEN_ENVS = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
# Ray's switch for single-machine clusters (its macOS/Windows default): the node's address
# becomes loopback, and with it every server Ray starts (GCS, raylet, workers, object
# manager, agents, metrics). Read by Ray at import and inherited by its processes.
SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_saved: dict[str, object] = {}  # what `_prepare_local_ray` changed in this process, for `_forget_local_ray`


def ray_init(address: str | None, metrics_port: int | None = None) -> None:
    """Joins the Ray cluster at `address`, or starts a local Ray, on loopback only, in this process."""
    if address is None:
        _prepare_local_ray()
    else:
        _forget_local_ray()
    import ray

    _check_version(ray.__version__)
    try:
        if address is None:
            _keep_on_loopback()
            ray.init(
                address="local",  # always a new private Ray, never one that RAY_ADDRESS points to
                include_dashboard=False,
                _metrics_export_port=metrics_port,
                log_to_driver=False,
                configure_logging=False,
            )
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, ValueError, RuntimeError) as e:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise GlyphEngineError(f"could not start or reach {where}: {first_line(e)}") from None
    if address is None:
        _check_loopback(ray)


def _prepare_local_ray() -> None:
    """Environment for a local Ray that listens on loopback and requires a token."""
    mode = os.environ.get(AUTH_MODE_ENV)
    if mode is not None and mode.strip().lower() != "token":
        raise GlyphEngineError(
            f"{AUTH_MODE_ENV}={mode} turns off Ray's token authentication, and a local Ray without it runs "
            f"commands for anyone who reaches it; unset {AUTH_MODE_ENV} (or set it to token)."
        )
    _saved.setdefault(SINGLE_MACHINE_ENV, os.environ.get(SINGLE_MACHINE_ENV))
    os.environ[SINGLE_MACHINE_ENV] = "0"
    # Ray's notice on start suggests RAY_AUTH_MODE=disabled "to opt out", which glyph-engine refuses.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    if not any(os.environ.get(name) for name in AUTH_TOKEN_ENVS):
        # A token for this run only, passed to Ray's processes through their environment, so
        # nothing is written to the user's home (Ray's default is ~/.ray/auth_token).
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)


def _keep_on_loopback() -> None:
    # Ray reads SINGLE_MACHINE_ENV when it is imported; if it was imported before this
    # call (serve imports its deployment first), set the value it read. `_check_loopback`
    # refuses to go on should a Ray release ignore it.
    from ray._private import ray_constants

    _saved.setdefault("ENABLE_RAY_CLUSTER", ray_constants.ENABLE_RAY_CLUSTER)
    ray_constants.ENABLE_RAY_CLUSTER = False


def _forget_local_ray() -> None:
    """Undoes `_prepare_local_ray`'s single-machine switch before joining a cluster from the
    same process: a driver that advertised loopback could not be reached by other nodes."""
    if SINGLE_MACHINE_ENV in _saved:
        value = _saved.pop(SINGLE_MACHINE_ENV)
        if value is None:
            os.environ.pop(SINGLE_MACHINE_ENV, None)
        else:
            os.environ[SINGLE_MACHINE_ENV] = value
    if "ENABLE_RAY_CLUSTER" in _saved:
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = _saved.pop("ENABLE_RAY_CLUSTER")


def _check_loopback(ray) -> None:
    addresses = {node.get("NodeManagerAddress", "") for node in ray.nodes()}
    if not addresses or not all(is_loopback(a) for a in addresses):
        ray.shutdown()
        raise GlyphEngineError(
            f"the local Ray listens on {', '.join(sorted(addresses)) or 'an unknown address'} instead of loopback "
            f"with Ray {ray.__version__}; install a Ray release from {_version_text(MIN_RAY_VERSION)} that honours "
            f"{SINGLE_MACHINE_ENV}=0, or run Ray yourself and pass --address."
        )


def is_loopback(host: str) -> bool:
    """Whether `host` (an address, or "localhost") is reachable from this machine only."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _check_version(version: str) -> None:
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits) if digits else 0)
    if tuple(parts) < MIN_RAY_VERSION:
        raise GlyphEngineError(
            f"Ray {version} is older than {_version_text(MIN_RAY_VERSION)}, the release glyph-engine secures its "
            "local Ray with (token authentication on by default) and is tested with; pip install 'glyph-engine[serve]'."
        )


def _version_text(version: tuple[int, ...]) -> str:
    return ".".join(str(v) for v in version)


def first_line(e: BaseException) -> str:
    """The line of a (Ray-wrapped) error that says what went wrong: its last non-empty one."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(e).__name__


def keep_replica_grpc_on_loopback() -> None:
    """Binds this Serve replica's inter-deployment gRPC server to loopback when its Ray is a
    private single-machine one.

    Ray Serve 2.60 starts that server in every replica on all interfaces ("[::]:0"), with no
    option to choose, and it calls the replica's methods for whoever connects: past the API's
    token. Nothing off this machine needs it when the node itself lives on loopback. Called
    in the replica's process before Serve starts the server (the deployment's constructor);
    `tests/test_ray_loopback.py` reads the sockets, so a Serve release that moved the call
    fails there instead of exposing the replica.
    """
    import ray
    from ray.serve._private import replica

    if not is_loopback(ray.util.get_node_ip_address()):
        return  # a cluster: other nodes reach replicas through it; the operator secures the network
    bind = replica.add_port_to_grpc_server
    if getattr(bind, "_glyph_engine_loopback", False):
        return

    def loopback(server, address: str):
        host, _, port = address.rpartition(":")
        return bind(server, f"127.0.0.1:{port}" if host in ("[::]", "0.0.0.0", "") else address)

    loopback._glyph_engine_loopback = True
    replica.add_port_to_grpc_server = loopback
