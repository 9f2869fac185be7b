"""Stage functions that misbehave for real (for tests/test_local_faults.py): they kill their own
worker process, hang, start threads that never end, or return big results. Importable by
spawned worker processes (tests/ is on PYTHONPATH)."""

import ctypes
import os
import signal
import threading
import time


def die_on(x, victim=5, how="exit", delay=0.05):
    """Item ``victim`` kills its own worker process (os._exit, a segfault, or SIGKILL)."""
    time.sleep(delay)
    if x == victim:
        if how == "segv":
            ctypes.string_at(0)
        elif how == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(3)
    return x


def record_pid_then_sleep(x=0, folder="", seconds=600.0):
    """Write this worker's pid to ``folder/<x>.pid``, then sleep (a stage that never returns)."""
    path = os.path.join(folder, f"{x}.pid")
    with open(path + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(path + ".tmp", path)
    time.sleep(seconds)
    return x


def start_endless_thread():
    """Starts a non-daemon thread that never ends (a forgotten Timer, a client's background loop)."""

    def spin():
        while True:
            time.sleep(0.2)

    threading.Thread(target=spin, name="user-endless", daemon=False).start()
    return os.getpid()


def always_fails(x):
    raise ValueError(f"item {x} is bad")


def quick(n=3):
    return list(range(n))


def sized(i=0, megabytes=20):
    return bytearray(megabytes * 1_000_000)


def nap(x, delay=0.2):
    time.sleep(delay)
    return x
