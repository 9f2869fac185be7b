"""How the Ray executor starts, guards and watches its Ray connection: a node it owns listens on
loopback only, the auth token is private to the user, and a lost head fails runs instead of
letting Ray end the whole process."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
import time
from pathlib import Path

from .call_gate import CallGate, GateClosed

log = logging.getLogger("flowdapt_nb")

LOOPBACK = "127.0.0.1"
# Seconds an attached driver's Ray keeps trying to reach a head that stopped answering before it
# ends the process (Ray's own default is 60). Raised so the head monitor always disconnects first.
DRIVER_RECONNECT_TIMEOUT_S = "600"

# Defaults for Flowdapt's connection fields, when the config leaves them unset.
MONITOR_INTERVAL = 2.0
PING_TIMEOUT = 5.0  # generous: a busy machine must not look like a dead head
PING_FAILURES = 3


# --- an owned node: loopback only ---------------------------------------------------------------


@contextlib.contextmanager
def loopback_node():
    """While a ``ray.init`` that starts a node runs inside this block, every service of that
    node (GCS, raylet, object manager, workers, dashboard agent, runtime-env agent, metrics
    exporter) binds to 127.0.0.1.

    Why: ray.init rewrites ``_node_ip_address="127.0.0.1"`` to the machine's address (it wants
    other machines to reach the node) unless Ray believes clusters are off on this platform;
    that switch is read at call time, so flipping it for the start keeps the node on loopback.
    Pass ``_node_ip_address=LOOPBACK`` to ray.init as well."""
    from ray._private import ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def driver_outlives_head() -> None:
    """Before ray.init: Ray's driver waits ``DRIVER_RECONNECT_TIMEOUT_S`` for a lost head instead
    of 60 s before ending the process (unless the user set it), so the head monitor has time to
    fail the runs and disconnect cleanly. Set for the life of the process: Ray reads it again
    while disconnecting (restored right after ray.init, Ray still ended the driver at 60 s).
    Processes of a node started later inherit it: a raylet then waits as long for a lost GCS."""
    key = "RAY_gcs_rpc_server_reconnect_timeout_s"
    if key in os.environ:
        return
    os.environ[key] = DRIVER_RECONNECT_TIMEOUT_S
    try:  # Ray caches its config when imported: refresh it, as Ray itself does after such a change
        from ray._raylet import Config  # type: ignore[attr-defined]  # not in ray's stubs

        Config.initialize("")
    except Exception:
        pass


# --- the auth token: readable by its owner only --------------------------------------------------


def token_path() -> Path | None:
    """The token file Ray uses (``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``); None when the
    token comes from ``RAY_AUTH_TOKEN``."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return None
    custom = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return Path(custom).expanduser() if custom else Path.home() / ".ray" / "auth_token"


def ensure_private_token() -> None:
    """Before Ray starts a node with token auth: write the token ourselves, mode 0600, when none
    exists (Ray would write it 0644, readable by every local user, who could then run code as
    this user on the cluster)."""
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        return
    path = token_path()
    if path is None or path.exists():
        return
    from ray._private.authentication.authentication_token_generator import generate_new_authentication_token

    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # written meanwhile by another process: tighten it below
        return
    with os.fdopen(fd, "w") as f:
        f.write(generate_new_authentication_token())


def token_source() -> str | None:
    """Where this driver's token comes from, as the user would name it (None: no token)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "the RAY_AUTH_TOKEN environment variable"
    path = token_path()
    if path is not None and path.is_file():
        return f"the token file {path}" + (
            " (RAY_AUTH_TOKEN_PATH)" if os.environ.get("RAY_AUTH_TOKEN_PATH") else ""
        )
    return None


def attach_with_token() -> bool:
    """Before attaching by address: when this driver has a token (``RAY_AUTH_TOKEN``,
    ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``) and ``RAY_AUTH_MODE`` is unset, token auth
    is turned on for this process (Ray turns it on by itself only when it starts a cluster; a
    driver that attaches must be told, or it sends no token). True when it changed the setting."""
    if "RAY_AUTH_MODE" in os.environ or token_source() is None:
        return False
    os.environ["RAY_AUTH_MODE"] = "token"
    _refresh_ray_config()
    return True


def undo_attach_with_token() -> None:
    """An attach that failed leaves the process's Ray settings as they were."""
    os.environ.pop("RAY_AUTH_MODE", None)
    _refresh_ray_config()


def _refresh_ray_config() -> None:
    try:  # Ray caches its config (and the token) when imported: refresh them, as Ray itself does
        from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]  # not in ray's stubs

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    except Exception:
        pass


class TokenRefusedError(ConnectionError):
    """The Ray cluster refused this driver's auth token, or wants one the driver lacks."""


_TOKEN_SETTINGS = (
    "set RAY_AUTH_TOKEN to the cluster's token, or RAY_AUTH_TOKEN_PATH to a file that holds "
    "it (default ~/.ray/auth_token); `ray get-auth-token` on the head node prints it"
)


def check_token(address: str, timeout: float) -> str | None:
    """Ask the head's GCS at ``address`` (host:port) one cheap question with this driver's token:
    a token it refuses (or none, where it wants one) is a TokenRefusedError at once that says
    which setting to fix. Ray itself would retry ~20 s and then fail without naming the token. None
    when the GCS answered; else why it didn't (still starting, or gone)."""
    import grpc  # type: ignore[import-untyped]  # installed with ray, no stubs
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    metadata: tuple = ()
    source = token_source()
    if source is not None:
        from ray._raylet import AuthenticationTokenLoader  # type: ignore[attr-defined]  # not in ray's stubs

        loader = AuthenticationTokenLoader.instance()
        loader.reset_cache()
        if loader.has_token(ignore_auth_mode=True):
            metadata = tuple(loader.get_token_for_http_header().items())
    from .cluster import host_port

    host, port = host_port(address, 6379)
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        try:
            request = gcs_service_pb2.GetClusterIdRequest()  # type: ignore[attr-defined]  # generated code
            stub.GetClusterId(request, metadata=metadata, timeout=timeout)
            return None
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAUTHENTICATED:
                return f"its GCS did not answer ({exc.code().name}: {' '.join(str(exc.details()).split())[:200]})"
    if metadata:
        raise TokenRefusedError(
            f"the Ray cluster at cluster_address '{address}' refused this driver's auth "
            f"token (from {source}): it was started with token auth and another token; "
            f"{_TOKEN_SETTINGS}"
        )
    raise TokenRefusedError(
        f"the Ray cluster at cluster_address '{address}' requires an auth token (it was "
        f"started with token auth) and this driver has none: {_TOKEN_SETTINGS}"
    )


def tighten_token() -> None:
    """A token file of ours that others may read (an older Ray wrote it 0644) becomes 0600."""
    path = token_path()
    try:
        st = path.stat() if path is not None else None
    except OSError:
        return
    if st is None or st.st_uid != os.getuid() or not stat.S_ISREG(st.st_mode):
        return
    if path is not None and st.st_mode & 0o077:
        os.chmod(path, stat.S_IMODE(st.st_mode) & 0o700)


# --- the head monitor ------------------------------------------------------------------------------


class HeadMonitor:
    """Pings the Ray head (its GCS) from a thread every ``interval`` s, each ping bounded by
    ``timeout`` s; after ``failures`` pings in a row go unanswered, calls ``on_lost(reason)`` once
    and stops. Ray alone would report nothing for a minute and then end the process."""

    def __init__(
        self,
        on_lost,
        interval: float | None = None,
        timeout: float | None = None,
        failures: int | None = None,
        *,
        gate: CallGate,
    ):
        self.on_lost = on_lost
        self.gate = gate  # pings stay clear of ray.shutdown(): see call_gate
        self.interval = MONITOR_INTERVAL if interval is None else max(0.05, float(interval))
        self.timeout = PING_TIMEOUT if timeout is None else max(0.1, float(timeout))
        self.failures = PING_FAILURES if failures is None else max(1, int(failures))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="flowdapt-nb-ray-head", daemon=True)

    def start(self) -> HeadMonitor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(self.timeout + 1)

    def _ping(self) -> str | None:
        """None when the head answered, else why not."""
        try:
            import ray

            with self.gate:
                gcs = ray._private.worker.global_worker.gcs_client  # type: ignore[attr-defined]  # not in ray's stubs
                gcs.internal_kv_get(b"flowdapt_nb_ping", None, timeout=self.timeout)
            return None
        except GateClosed:  # closing: not a missed ping
            return None
        except Exception as exc:
            return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"

    def _loop(self) -> None:
        missed = 0
        while not self._stop.wait(self.interval):
            t0 = time.monotonic()
            why = self._ping()
            if self._stop.is_set():
                return
            if why is None:
                missed = 0
                continue
            missed += 1
            log.warning(
                "the Ray head did not answer a ping (%d of %d, %.1f s): %s",
                missed,
                self.failures,
                time.monotonic() - t0,
                why,
            )
            if missed >= self.failures:
                self._stop.set()
                self.on_lost(
                    f"its head (GCS) did not answer {missed} pings in a row "
                    f"({self.timeout:g} s each, every {self.interval:g} s; last: {why})"
                )
                return
