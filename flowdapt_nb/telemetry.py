"""Resource sampling: a thread per executor that samples its workers at a set interval,
keeps a bounded history, and publishes each sample on the executor's event stream."""

from __future__ import annotations

import logging
import threading
from collections import deque

log = logging.getLogger("flowdapt_nb")


def gpu_stats():
    """(utilization %, memory used, memory total) over this machine's GPUs via pynvml, or None
    when pynvml is missing or there is no GPU (neither is an error)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        if not count:
            return None
        util = used = total = 0
        for i in range(count):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            util += pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            used += mem.used
            total += mem.total
        return util / count, used, total
    except Exception:
        return None


def add_gpu(sample) -> None:
    stats = gpu_stats()
    if stats is not None:
        sample.gpu_percent, sample.gpu_memory_used, sample.gpu_memory_limit = stats


class ResourceSampler:
    """Samples ``executor._sample()`` every ``interval`` seconds on a daemon thread."""

    def __init__(self, executor, interval: float, history_limit: int):
        self.executor = executor
        self.interval = interval
        self.history_limit = history_limit
        self._history: dict[str, deque] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.enabled = True

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="flowdapt-nb-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=max(5.0, self.interval * 2))
        self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            if not self.enabled:
                continue
            self.sample_once()

    def sample_once(self) -> list:
        try:
            samples = self.executor._sample()
        except Exception as exc:  # a cluster going away mid-sample is not fatal for the sampler
            log.debug("resource sample failed: %s", exc)
            return []
        with self._lock:
            for s in samples:
                self._history.setdefault(s.worker, deque(maxlen=self.history_limit)).append(s)
        for s in samples:
            self.executor.events.publish(s)
        return samples

    def history_frame(self):
        import pandas as pd

        with self._lock:
            rows = [s.to_row() for q in self._history.values() for s in q]
        frame = pd.DataFrame(rows)
        if not frame.empty:
            frame = frame.sort_values(["time", "worker"]).reset_index(drop=True)
        return frame

    def __len__(self) -> int:
        with self._lock:
            return sum(len(q) for q in self._history.values())


# --- what our own running tasks hold ----------------------------------------------------------


def stage_request(stage) -> dict:
    """The resources one task of ``stage`` holds while it runs, in our names (cpus, gpus,
    memory in bytes, custom names); a task with no cpus given holds one."""
    from .units import parse_bytes

    held: dict[str, float] = {"cpus": 1.0}
    for name, amount in (stage.resources or {}).items():
        try:
            held[name] = float(parse_bytes(amount) if name == "memory" else amount or 0)
        except (TypeError, ValueError):
            continue
    return {name: amount for name, amount in held.items() if amount}


def running_requests(executor) -> list[tuple[str | None, dict]]:
    """(worker, resources held) of every task of this executor's active runs that is running
    now, from the run records the engine and the workers' 'running' reports keep. This is the
    in-use figure that is never stale (a cluster's own view can lag by seconds)."""
    out = []
    for handle, _ in list(getattr(executor, "_active", {}).values()):
        run = handle.run
        requests = {s.name: stage_request(s) for s in run.definition.stages}
        with run._lock:
            rows = [(r["stage"], r["worker"]) for r in run._tasks.values() if r["state"] == "running"]
        for stage, worker in rows:
            out.append((worker, requests.get(stage, {"cpus": 1.0})))
    return out


def add_up(requests, names: dict | None = None) -> dict:
    """Sum resources held, renamed by ``names`` (e.g. Ray's {'cpus': 'CPU', 'gpus': 'GPU'})."""
    total: dict[str, float] = {}
    for _, held in requests:
        for name, amount in held.items():
            name = (names or {}).get(name, name)
            total[name] = total.get(name, 0.0) + amount
    return total


def available_given(total: dict, used: dict) -> dict:
    """What is left of each total when ``used`` is held (never below 0)."""
    return {name: max(0.0, amount - used.get(name, 0.0)) for name, amount in total.items()}
