"""Pieces Dask and Ray executors share: reachability checks, resource matching, env vars."""

from __future__ import annotations

import difflib
import os
import socket
from urllib.parse import urlparse

from ..errors import ConfigError
from ..units import parse_bytes


def host_port(address: str, default_port: int) -> tuple[str, int]:
    """``tcp://127.0.0.1:8786`` / ``127.0.0.1:6379`` / ``ray://h:10001`` -> (host, port)."""
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    return parsed.hostname or "127.0.0.1", parsed.port or default_port


def ensure_reachable(kind: str, address: str, default_port: int, timeout: float) -> None:
    """Fail within ``timeout`` seconds, with a clear message, if nothing listens at ``address``."""
    host, port = host_port(address, default_port)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise ConnectionError(
            f"can't reach the {kind} cluster at cluster_address '{address}' "
            f"({host}:{port}) within {timeout:g} s: {exc.strerror or exc}; "
            f"is it running? (connect_timeout sets the wait)"
        ) from None


def check_resource_request(stage, offered: list[dict], where: str, soft: dict | None = None) -> None:
    """Raise a ConfigError naming the resource if no worker in ``offered`` can ever hold the
    stage's request. ``offered``: one dict of resource -> amount per worker/node. ``soft``: resources
    checked against another capacity when workers don't advertise them (name -> max per worker)."""
    soft = soft or {}
    names = sorted({n for w in offered for n in w})
    for name, amount in stage.resources.items():
        if not amount:
            continue
        value = parse_bytes(amount) if name == "memory" else amount
        if name not in names:
            if name in soft:
                if value > soft[name]:
                    raise ConfigError(
                        f"asks for {name}: {amount} but the largest {where} worker has {soft[name]:g}",
                        stage=stage.name,
                        key=f"resources.{name}",
                    )
                continue
            near = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
            have = ", ".join(f"{n}" for n in names) or "none"
            hint = f"the nearest it has is '{near[0]}'" if near else f"it offers: {have}"
            raise ConfigError(
                f"asks for resource '{name}', which no {where} worker has",
                stage=stage.name,
                key=f"resources.{name}",
                hint=hint,
            )
        best = max(w.get(name, 0) for w in offered)
        if value > best:
            shown = f"{best / 1e9:.2f} GB" if name == "memory" else f"{best:g}"
            raise ConfigError(
                f"asks for {name}: {amount} but the largest {where} worker offers {shown}",
                stage=stage.name,
                key=f"resources.{name}",
            )


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def apply_env(env: dict) -> None:
    """Set the executor's env_vars in this worker process (cheap when already set)."""
    for key, value in env.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


def gpu_count() -> int:
    try:
        import pynvml  # optional

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetCount()
    except Exception:
        return 0
