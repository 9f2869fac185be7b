#!/usr/bin/env python
"""flowdapt_nb against the raw engines, side by side in one run.

    .venv/bin/python benchmarks/run.py --size full            # every section, every backend
    .venv/bin/python benchmarks/run.py --size tiny --out /tmp/b  # the smoke run (seconds, not minutes)
    .venv/bin/python benchmarks/run.py --backends ray,dask --sections overhead,data

Each row times flowdapt_nb and its baseline (the raw engine doing the same work, an ideal, or the
same run unwatched) on the same cluster, alternating which goes first, ``reps`` times; the table
shows medians and their ratio. Results go to ``--out`` as bench-SIZE.csv / .json / .md.
See benchmarks/README.md for what each section measures.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import csv
import gc
import json
import logging
import multiprocessing
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict, deque
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# Workers (spawned pool processes, Dask nannies, Ray workers) find the workloads module too;
# cloudpickle also ships it by value (below), so this is only a fallback.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import cloudpickle  # noqa: E402
import psutil  # noqa: E402
import workloads as W  # noqa: E402

cloudpickle.register_pickle_by_value(W)

BACKENDS = ["threads", "processes", "dask", "ray"]
SECTIONS = ["overhead", "perrun", "throughput", "dag", "data", "startup", "watching"]

# Per size: items per overhead row, CPU-bound items and seconds each, DAG fan-out width and
# seconds per item, MB through the data pipeline, repetitions of each row, of the data rows (a
# fresh 200 MB object now and then costs the object store a page-fault storm: more reps, steadier
# medians) and of startup; the run-store rows' (tiny tasks per run, runs per timed batch).
SIZES = {
    "tiny": dict(
        overhead=[20],
        tp_items=8,
        tp_seconds=0.005,
        dag_items=6,
        dag_seconds=0.002,
        data_mb=8,
        reps=1,
        data_reps=1,
        startup_reps=1,
        watch_items=8,
        perrun=20,
        store_runs=[(20, 2), (100, 1)],
        store_reps=1,
    ),
    "small": dict(
        overhead=[1000],
        tp_items=40,
        tp_seconds=0.02,
        dag_items=40,
        dag_seconds=0.005,
        data_mb=50,
        reps=3,
        data_reps=5,
        startup_reps=1,
        watch_items=40,
        perrun=100,
        store_runs=[(200, 20), (5000, 2)],
        store_reps=3,
    ),
    "full": dict(
        overhead=[1000, 10000],
        tp_items=200,
        tp_seconds=0.02,
        dag_items=200,
        dag_seconds=0.005,
        data_mb=200,
        reps=5,
        data_reps=9,
        startup_reps=3,
        watch_items=200,
        perrun=200,
        store_runs=[(200, 50), (5000, 5)],
        store_reps=11,  # the store's few percent against GC passes of ~15 ms: more samples
    ),
}

CORES = 2  # workers every backend gets (the machine has 2 cores; see FACTS.md)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- measuring --------------------------------------------------------------------------------


class TreeCPU:
    """CPU seconds (user + system) used by this process and every process it started (pool
    workers, Dask nannies and workers, Ray's raylet and workers). Unlike wall time, it hardly
    moves with other load on the machine, so it shows a cost even when timings are noisy."""

    def __init__(self):
        self.me = psutil.Process()
        self.procs: dict = {}

    def now(self) -> float:
        total = time.process_time()  # this process, all threads, at full resolution
        try:
            children = self.me.children(recursive=True)
        except psutil.Error:
            children = []
        for p in children:
            p = self.procs.setdefault(p.pid, p)
            try:
                total += sum(p.cpu_times()[:2])
            except psutil.Error:
                pass
        return total


_cpu = TreeCPU()
CPU: dict = {}  # id(run callable) -> [cpu seconds], filled by timed()


def timed(fn):
    gc.collect()
    c0 = _cpu.now()
    t0 = time.perf_counter()
    value = fn()
    dt = time.perf_counter() - t0
    CPU.setdefault(id(fn), []).append(_cpu.now() - c0)
    return dt, value


def alternate(contenders: dict, reps: int, check=None) -> dict:
    """Time each contender ``reps`` times, rotating which goes first; {name: [seconds]}.

    A contender is a callable, or (setup, run, teardown) where only ``run`` is timed."""
    names = list(contenders)
    out = {n: [] for n in names}
    out["cpu"] = {n: [] for n in names}
    for rep in range(reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            c = contenders[name]
            setup, run, teardown = c if isinstance(c, tuple) else (None, c, None)
            state = setup() if setup else None
            try:
                dt, value = timed(run)
            finally:
                if teardown:
                    teardown(state)
            if check is not None and rep == 0:
                check(name, value)
            out[name].append(dt)
            out["cpu"][name].append(CPU.pop(id(run))[-1])
    return out


def median(xs):
    return statistics.median(xs) if xs else float("nan")


class PeakRSS:
    """This process's peak resident memory over a block, above what it used at the start.

    Linux resets the high-water mark (VmHWM) by writing 5 to /proc/self/clear_refs; elsewhere a
    thread samples RSS every 2 ms."""

    def __enter__(self):
        gc.collect()
        self.proc = psutil.Process()
        self.base = self.proc.memory_info().rss
        self.exact = False
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.exact = self._hwm() is not None
        except OSError:
            pass
        if not self.exact:
            self.peak = self.base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    @staticmethod
    def _hwm():
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def _poll(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        if self.exact:
            self.peak = self._hwm()
        else:
            self._stop.set()
            self._thread.join()
        self.mb = max(0, self.peak - self.base) / 1e6


class DashboardLike:
    """What a live dashboard does with the feed: per-task state, per-stage counts and a redraw
    (an HTML string) per throttled batch, resource samples kept in a bounded window."""

    def __init__(self):
        self.tasks: dict = {}
        self.samples: deque = deque(maxlen=600)
        self.batches = self.events = 0
        self.html = ""
        self.lock = threading.Lock()

    def __call__(self, batch):
        with self.lock:
            self.batches += 1
            for ev in batch:
                self.events += 1
                if ev.kind == "task":
                    self.tasks[(ev.run, ev.stage, ev.item)] = ev.state
                elif ev.kind == "sample":
                    self.samples.append(ev.to_row())
            counts: dict = defaultdict(Counter)
            for (_, stage, _), state in self.tasks.items():
                counts[stage][state] += 1
            self.html = (
                "<table>"
                + "".join(
                    f"<tr><td>{stage}</td>"
                    + "".join(f"<td>{s}: {n}</td>" for s, n in sorted(c.items()))
                    + "</tr>"
                    for stage, c in counts.items()
                )
                + "</table>"
            )


# --- rows -------------------------------------------------------------------------------------

NO_RATIO = object()  # a row whose two values don't make a meaningful ratio (memory near zero)


class Results:
    def __init__(self):
        self.rows: list[dict] = []

    def add(
        self,
        section,
        case,
        backend,
        fnb,
        baseline,
        baseline_name,
        unit="s",
        target=None,
        note="",
        samples=None,
        ratio=None,
        ok=None,
        target_text=None,
        cpu=None,
    ):
        if ratio is NO_RATIO:
            ratio = None
        elif ratio is None and baseline:
            ratio = fnb / baseline
        if ok is None and target is not None and ratio is not None:
            ok = ratio <= target
        row = dict(
            section=section,
            case=case,
            backend=backend,
            flowdapt_nb=fnb,
            baseline=baseline,
            baseline_name=baseline_name,
            unit=unit,
            ratio=ratio,
            target=target,
            ok=ok,
            note=note,
            target_text=target_text or (f"<= {target:.2f}" if target is not None else ""),
            cpu_flowdapt_nb=None,
            cpu_baseline=None,
            cpu_ratio=None,
            samples=samples or {},
        )
        if cpu is not None:  # CPU seconds of the whole process tree, flowdapt_nb vs the baseline
            row["cpu_flowdapt_nb"], row["cpu_baseline"] = median(cpu[0]), median(cpu[1])
            if row["cpu_baseline"] > 0:
                row["cpu_ratio"] = row["cpu_flowdapt_nb"] / row["cpu_baseline"]
        self.rows.append(row)
        log(
            f"  {section:<11} {case:<34} {backend:<9} fnb {_fmt(fnb, unit):>9}  {baseline_name} "
            f"{_fmt(baseline, unit):>9}  ratio {_fmt_ratio(ratio)}  cpu {_fmt_ratio(row['cpu_ratio'])}  {note}"
        )
        return row


def _fmt(value, unit):
    if value is None or value != value:
        return "-"
    if unit == "s":
        return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"
    return f"{value:.1f} {unit}"


def _fmt_ratio(r):
    return "-" if r is None or r != r else f"{r:.2f}x"


# --- the backends, each with its raw-engine twin -------------------------------------------------


class Bench:
    """One backend: a flowdapt_nb executor and the raw engine, on the same workers where the
    engine allows it."""

    kind = "?"
    raw_name = "raw"

    def __init__(self, cfg):
        self.cfg = cfg
        self.ex = None

    def start(self):
        raise NotImplementedError

    def close(self):
        if self.ex is not None:
            self.ex.close()
            self.ex = None

    # raw versions of each workload
    def raw_map(self, fn, items, **kw):
        raise NotImplementedError

    def raw_dag(self, n, rounds):
        raise NotImplementedError

    def raw_data(self, mb):
        raise NotImplementedError

    # flowdapt_nb
    def run(self, wf, input):
        return self.ex.run(wf, input=input).result


class ThreadsBench(Bench):
    kind = "threads"
    raw_name = "ThreadPoolExecutor.map"

    def start(self):
        import flowdapt_nb as fnb

        self.ex = fnb.LocalExecutor(use_processes=False, cpus=CORES).start()
        self.pool = cf.ThreadPoolExecutor(max_workers=CORES)

    def close(self):
        try:
            super().close()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def _submit(self, fn, *args):
        return self.pool.submit(fn, *args)

    def raw_map(self, fn, items, **kw):
        if kw:
            return list(self.pool.map(lambda x: fn(x, **kw), items))
        return list(self.pool.map(fn, items))

    def raw_dag(self, n, rounds):
        items = self._submit(W.source, n, rounds).result()
        lefts = [self._submit(W.left, it) for it in items]
        rights = [self._submit(W.right, it) for it in items]
        reduced = self._submit(W.reduce_sum, [f.result() for f in lefts])
        return self._submit(W.combine, reduced.result(), [f.result() for f in rights]).result()

    def raw_tiny_dag(self, n):
        items = self._submit(W.tiny_source, n).result()
        incs = [self._submit(W.tiny_inc, x) for x in items]
        total = self._submit(W.tiny_sum, [f.result() for f in incs]).result()
        return self._submit(W.tiny_double, total).result()


class ProcessesBench(ThreadsBench):
    kind = "processes"
    raw_name = "ProcessPoolExecutor+cloudpickle"

    def start(self):
        import flowdapt_nb as fnb

        self.ex = fnb.LocalExecutor(use_processes=True, cpus=CORES).start()
        self.pool = cf.ProcessPoolExecutor(max_workers=CORES, mp_context=multiprocessing.get_context("spawn"))
        self._blobs: dict = {}

    def _blob(self, fn):
        blob = self._blobs.get(fn)
        if blob is None:
            blob = self._blobs[fn] = cloudpickle.dumps(fn)
        return blob

    def _submit(self, fn, *args):
        return self.pool.submit(W.call_pickled, self._blob(fn), *args)

    def raw_map(self, fn, items, **kw):
        blob = self._blob(fn)
        if kw:
            rounds = kw["rounds"]
            return list(self.pool.map(W.call_pickled, [blob] * len(items), items, [rounds] * len(items)))
        return list(self.pool.map(W.call_pickled, [blob] * len(items), items))


class DaskBench(Bench):
    kind = "dask"
    raw_name = "client.map+gather"

    def start(self):
        import flowdapt_nb as fnb

        self.ex = fnb.DaskExecutor(cpus=CORES, threads=1).start()
        self.client = self.ex.client  # the raw runs use the same cluster

    def raw_map(self, fn, items, **kw):
        return self.client.gather(self.client.map(fn, items, pure=False, **kw))

    def raw_dag(self, n, rounds):
        c = self.client
        items = c.submit(W.source, n, rounds, pure=False).result()
        lefts = c.map(W.left, items, pure=False)
        rights = c.map(W.right, items, pure=False)
        reduced = c.submit(W.reduce_sum, lefts, pure=False)
        return c.submit(W.combine, reduced, rights, pure=False).result()

    def raw_data(self, mb):
        c = self.client
        a = c.submit(W.make_array, mb, pure=False)
        b = c.submit(W.scale, a, pure=False)
        return c.submit(W.total, b, pure=False).result()

    def start_raw(self):
        from distributed import Client, LocalCluster

        cluster = LocalCluster(
            n_workers=CORES,
            threads_per_worker=1,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
            processes=True,
            silence_logs=logging.ERROR,
        )
        client = Client(cluster, set_as_default=False)
        return cluster, client


class RayBench(Bench):
    kind = "ray"
    raw_name = "ray.remote+ray.get"

    def start(self):
        import ray

        import flowdapt_nb as fnb

        self.ray = ray
        self.ex = fnb.RayExecutor(cpus=CORES, logging_level="error").start()
        self._remotes: dict = {}

    def remote(self, fn):
        r = self._remotes.get(fn)
        if r is None:
            r = self._remotes[fn] = self.ray.remote(fn)
        return r

    def raw_map(self, fn, items, **kw):
        f = self.remote(fn)
        return self.ray.get([f.remote(x, **kw) for x in items])

    def raw_dag(self, n, rounds):
        ray, r = self.ray, self.remote
        items = ray.get(r(W.source).remote(n, rounds))
        lefts = [r(W.left).remote(it) for it in items]
        rights = [r(W.right).remote(it) for it in items]
        reduced = r(W.reduce_star).remote(*lefts)
        return ray.get(r(W.combine_star).remote(reduced, *rights))

    def raw_data(self, mb):
        r = self.remote
        a = r(W.make_array).remote(mb)
        b = r(W.scale).remote(a)
        return self.ray.get(r(W.total).remote(b))


BENCHES = {"threads": ThreadsBench, "processes": ProcessesBench, "dask": DaskBench, "ray": RayBench}


# --- workflows --------------------------------------------------------------------------------


def map_workflow(name, fn):
    import flowdapt_nb as fnb

    return fnb.Workflow(
        name, stages=[fnb.Stage(fn.__name__, fn, type="parameterized", options={"map_on": "items"})]
    )


def dag_workflow():
    import flowdapt_nb as fnb

    return fnb.Workflow(
        "dag5",
        stages=[
            fnb.Stage("source", W.source),
            fnb.Stage("left", W.left, type="parameterized", depends_on=["source"]),
            fnb.Stage("right", W.right, type="parameterized", depends_on=["source"]),
            fnb.Stage("reduce", W.reduce_sum, depends_on=["left"]),
            fnb.Stage("combine", W.combine, depends_on=["reduce", "right"]),
        ],
    )


def data_workflow():
    import flowdapt_nb as fnb

    return fnb.Workflow(
        "data3",
        stages=[
            fnb.Stage("make", W.make_array),
            fnb.Stage("scale", W.scale, depends_on=["make"]),
            fnb.Stage("total", W.total, depends_on=["scale"]),
        ],
    )


def expect(value):
    def check(name, got):
        if got != value:
            raise AssertionError(f"{name} returned {str(got)[:80]!r}, expected {str(value)[:80]!r}")

    return check


# --- sections ---------------------------------------------------------------------------------


def sec_overhead(b: Bench, res: Results, cfg):
    wf = map_workflow("overhead", W.inc)
    for n in cfg["overhead"]:
        items = list(range(n))
        want = [x + 1 for x in items]
        s = alternate(
            {
                "fnb": lambda items=items: b.run(wf, {"items": items}),
                "raw": lambda items=items: b.raw_map(W.inc, items),
            },
            cfg["reps"],
            expect(want),
        )
        res.add(
            "overhead",
            f"{n:,} tiny items",
            b.kind,
            median(s["fnb"]),
            median(s["raw"]),
            b.raw_name,
            target=1.10,
            samples=s,
            cpu=(s["cpu"]["fnb"], s["cpu"]["raw"]),
        )


def tiny_dag_workflow():
    import flowdapt_nb as fnb

    return fnb.Workflow(
        "tiny4",
        stages=[
            fnb.Stage("source", W.tiny_source),
            fnb.Stage("inc", W.tiny_inc, type="parameterized", depends_on=["source"]),
            fnb.Stage("sum", W.tiny_sum, depends_on=["inc"]),
            fnb.Stage("double", W.tiny_double, depends_on=["sum"]),
        ],
    )


def sec_perrun(b: Bench, res: Results, cfg):
    """The fixed cost of a run: many runs of a tiny 4-stage DAG (source, fan-out x4, fan-in, one
    more) and of a 1-stage workflow, each against the same calls on the raw pool; per-run medians
    of batches of ``perrun`` runs, in ms."""
    if b.kind not in ("threads", "processes"):
        return
    runs = cfg["perrun"]
    dag = tiny_dag_workflow()
    one = fnb_one_stage()

    def batch(fn):
        def go():
            value = None
            for _ in range(runs):
                value = fn()
            return value

        return go

    rows = [
        ("4-stage tiny DAG, per run", dag, {"n": 4}, lambda: b.raw_tiny_dag(4), W.tiny_expected(4)),
        ("1-stage tiny workflow, per run", one, {"x": 1}, lambda: b._submit(W.tiny_inc, 1).result(), 2),
    ]
    for case, wf, run_input, raw, want in rows:
        s = alternate(
            {"fnb": batch(lambda wf=wf, run_input=run_input: b.run(wf, run_input)), "raw": batch(raw)},
            cfg["reps"],
            expect(want),
        )
        per = {k: [t * 1000 / runs for t in s[k]] for k in ("fnb", "raw")}
        fnb_ms, raw_ms = median(per["fnb"]), median(per["raw"])
        res.add(
            "perrun",
            case,
            b.kind,
            fnb_ms,
            raw_ms,
            b.raw_name.split(".")[0].split("+")[0],
            unit="ms",
            target=None,
            ok=fnb_ms - raw_ms <= 1.0,
            target_text="<= raw + 1 ms",
            samples=per,
            cpu=(s["cpu"]["fnb"], s["cpu"]["raw"]),
            note=f"+{fnb_ms - raw_ms:.2f} ms a run over the raw pool",
        )


def fnb_one_stage():
    import flowdapt_nb as fnb

    return fnb.Workflow("one", stages=[fnb.Stage("inc", W.tiny_inc)])


def sec_throughput(b: Bench, res: Results, cfg):
    n, rounds, t_item = cfg["tp_items"], cfg["rounds"], cfg["t_item"]
    ideal = n * t_item / CORES
    wf = map_workflow("throughput", W.burn)
    items = list(range(n))
    s = alternate(
        {
            "fnb": lambda: b.run(wf, {"items": items, "rounds": rounds}),
            "raw": lambda: b.raw_map(W.burn, items, rounds=rounds),
        },
        cfg["reps"],
        expect(items),
    )
    fnb, raw = median(s["fnb"]), median(s["raw"])
    res.add(
        "throughput",
        f"{n} x {t_item * 1000:.0f} ms CPU-bound",
        b.kind,
        fnb,
        ideal,
        "ideal N*t/cores",
        target=1.10,
        samples=s,
        cpu=(s["cpu"]["fnb"], s["cpu"]["raw"]),
        note=f"raw {_fmt(raw, 's')} = {raw / ideal:.2f}x ideal; flowdapt_nb/raw {fnb / raw:.2f}x",
    )


def sec_dag(b: Bench, res: Results, cfg):
    n, rounds = cfg["dag_items"], cfg["dag_rounds"]
    wf = dag_workflow()
    s = alternate(
        {"fnb": lambda: b.run(wf, {"n": n, "rounds": rounds}), "raw": lambda: b.raw_dag(n, rounds)},
        cfg["reps"],
        expect(W.dag_expected(n)),
    )
    res.add(
        "dag",
        f"5 stages, 2 fan-outs x {n}",
        b.kind,
        median(s["fnb"]),
        median(s["raw"]),
        f"hand-written {b.kind}",
        target=1.10,
        samples=s,
        cpu=(s["cpu"]["fnb"], s["cpu"]["raw"]),
    )


def sec_data(b: Bench, res: Results, cfg):
    if b.kind not in ("dask", "ray"):
        return
    mb = cfg["data_mb"]
    wf = data_workflow()
    want = W.data_expected(mb)
    times = {"fnb": [], "raw": []}
    peaks = {"fnb": [], "raw": []}
    cpus = {"fnb": [], "raw": []}
    runs = {"fnb": lambda: b.run(wf, {"mb": mb}), "raw": lambda: b.raw_data(mb)}
    for rep in range(max(cfg["reps"], cfg["data_reps"])):
        for name in ["fnb", "raw"] if rep % 2 == 0 else ["raw", "fnb"]:
            with PeakRSS() as peak:
                dt, value = timed(runs[name])
            cpus[name].append(CPU.pop(id(runs[name]))[-1])
            if value != want:
                raise AssertionError(f"data {name} returned {value}, expected {want}")
            times[name].append(dt)
            peaks[name].append(peak.mb)
    raw_label = "raw refs" if b.kind == "ray" else "raw futures"
    res.add(
        "data",
        f"{mb} MB array, 3 stages: time",
        b.kind,
        median(times["fnb"]),
        median(times["raw"]),
        raw_label,
        target=1.10,
        samples=times,
        cpu=(cpus["fnb"], cpus["raw"]),
    )
    fp, rp = max(peaks["fnb"]), max(peaks["raw"])
    res.add(
        "data",
        f"{mb} MB array: driver peak RSS",
        b.kind,
        fp,
        rp,
        raw_label,
        unit="MB",
        ratio=NO_RATIO,
        ok=fp < mb * 0.25,
        target=None,
        samples=peaks,
        target_text=f"< {mb * 0.25:g} MB",
        note="driver RSS above its start, max over reps: the array must stay in the cluster",
    )


def sec_watching(b: Bench, res: Results, cfg):
    """The same CPU-bound run: unwatched with sampling off; sampling on (default interval); sampling on
    and a dashboard-like subscriber (throttle 0.1 s); sampling on and the real widgets.Dashboard.
    Then the run store's cost (``_run_store_rows``)."""
    ex = b.ex
    sampler = ex._sampler
    n, rounds = cfg["watch_items"], cfg["rounds"]
    items = list(range(n))
    wf = map_workflow("watching", W.burn)
    interval = ex.config.sample_interval

    def run():
        return b.run(wf, {"items": items, "rounds": rounds})

    def watched(sampling: bool, watcher):
        """(setup, run, teardown): the watcher is attached before the timed run, as a dashboard
        shown before a run would be, and removed after it."""

        def setup():
            sampler.enabled = sampling
            if watcher == "subscriber":
                return ex.events.subscribe(DashboardLike(), throttle=0.1)
            if watcher == "widgets":
                from flowdapt_nb.widgets import Dashboard

                return Dashboard(ex)
            return None

        def teardown(state):
            if watcher == "subscriber":
                ex.events.unsubscribe(state)
            elif watcher == "widgets":
                state.close()
            sampler.enabled = True

        return setup, run, teardown

    contenders = {
        "off": watched(False, None),
        "sampling": watched(True, None),
        "subscriber": watched(True, "subscriber"),
    }
    try:
        from flowdapt_nb.widgets import Dashboard  # noqa: F401  (optional: the widgets package)

        contenders["widgets"] = watched(True, "widgets")
    except Exception as exc:
        log(f"  watching: widgets.Dashboard unavailable ({exc}); skipped")
    s = alternate(contenders, cfg["reps"], expect(items))
    off = median(s["off"])
    case = f"{n} x {cfg['t_item'] * 1000:.0f} ms"
    res.add(
        "watching",
        f"sampling on ({interval:g} s) vs off, {case}",
        b.kind,
        median(s["sampling"]),
        off,
        "sampling off",
        target=1.05,
        samples={"fnb": s["sampling"], "baseline": s["off"]},
        cpu=(s["cpu"]["sampling"], s["cpu"]["off"]),
    )
    res.add(
        "watching",
        f"+ subscriber (throttle 0.1 s), {case}",
        b.kind,
        median(s["subscriber"]),
        off,
        "unwatched, sampling off",
        target=1.05,
        samples={"fnb": s["subscriber"], "baseline": s["off"]},
        cpu=(s["cpu"]["subscriber"], s["cpu"]["off"]),
    )
    if "widgets" in s:
        res.add(
            "watching",
            f"+ widgets.Dashboard, {case}",
            b.kind,
            median(s["widgets"]),
            off,
            "unwatched, sampling off",
            target=1.05,
            samples={"fnb": s["widgets"], "baseline": s["off"]},
            cpu=(s["cpu"]["widgets"], s["cpu"]["off"]),
        )
    _run_store_rows(b, res, cfg)


def _run_store_rows(b: Bench, res: Results, cfg):
    """The run store's cost: the same runs of tiny tasks (a small and a large run) with ``runs:``
    off and on, on the same executor (the store detached and attached again between batches),
    ``store_reps`` batches each. The 'on' batch ends with a flush, so every write the runs caused
    is inside its timing."""
    ex = b.ex
    store = ex._run_store
    if store is None:
        log("  watching: the run store is off for this executor; run-store rows skipped")
        return
    wf = map_workflow("stored", W.inc)

    def store_on(on: bool):
        def setup():
            if on and ex._run_store is None:
                ex._run_store = store
                store.attach(ex)
            elif not on and ex._run_store is not None:
                store.flush()
                store.detach(ex)
                ex._run_store = None
            # each batch starts with no garbage-collector debt: a full pass (~15 ms on a heap
            # holding 100 runs of 5,000 results) falls in whichever batch happens to pay it
            gc.collect()

        return setup

    for n, runs in cfg["store_runs"]:
        items = list(range(n))
        flushes: list = []  # seconds the writes left at the end of an 'on' batch took to flush

        def batch(on: bool, runs=runs, items=items, flushes=flushes):
            def go():
                value = None
                for _ in range(runs):
                    value = b.run(wf, {"items": items})
                if on:
                    t0 = time.perf_counter()
                    store.flush()
                    flushes.append(time.perf_counter() - t0)
                return value

            return go

        s = alternate(
            {"off": (store_on(False), batch(False), None), "on": (store_on(True), batch(True), None)},
            cfg["store_reps"],
            expect([x + 1 for x in items]),
        )
        store_on(True)()  # leave it as it was: attached
        per = {k: [t * 1000 / runs for t in s[k]] for k in ("on", "off")}
        on_ms, off_ms = median(per["on"]), median(per["off"])
        res.add(
            "watching",
            f"runs: on vs off, {n:,} tiny tasks, per run",
            b.kind,
            on_ms,
            off_ms,
            "runs: off",
            unit="ms",
            target=1.05,
            samples={"fnb": per["on"], "baseline": per["off"]},
            cpu=(s["cpu"]["on"], s["cpu"]["off"]),
            note=f"run store {on_ms - off_ms:+.2f} ms a run ({runs} runs a batch, writes flushed inside "
            f"the timing; the flush at the batch's end {median(flushes) * 1000 / runs:.2f} ms a run)",
        )


def sec_startup(kind: str, res: Results, cfg):
    """Executor start to ready vs the engine's own start, alternating, each fully stopped between."""
    import flowdapt_nb as fnb

    one = map_workflow("first", W.inc)
    times = {
        "fnb start": [],
        "raw start": [],
        "fnb first": [],
        "raw first": [],
        "nowait start": [],
        "nowait first": [],
        "magic start": [],
        "magic first": [],
    }

    def make():
        return (
            fnb.DaskExecutor(cpus=CORES, threads=1)
            if kind == "dask"
            else fnb.RayExecutor(cpus=CORES, logging_level="error")
        )

    def nowait_once():
        """start(wait=False): the notebook is free again at t1; the first run waits for the start."""
        t0 = time.perf_counter()
        ex = make().start(wait=False)
        try:
            t1 = time.perf_counter()
            assert ex.run(one, input={"items": [1]}).result == [2]
            t2 = time.perf_counter()
        finally:
            ex.close()
        times["nowait start"].append(t1 - t0)
        times["nowait first"].append(t2 - t0)

    def magic_once():
        """``%flowdapt executor KIND --no-wait`` in an IPython shell (no kernel: no widgets), then
        the first run on the executor it made."""
        shell = _ipython()
        t0 = time.perf_counter()
        shell.run_line_magic("flowdapt", f"executor {kind} --cpus {CORES} --no-wait")
        t1 = time.perf_counter()
        ex = shell.user_ns["flowdapt_executor"]
        try:
            assert ex.run(one, input={"items": [1]}).result == [2]
            t2 = time.perf_counter()
        finally:
            shell.run_line_magic("flowdapt", "stop")
        times["magic start"].append(t1 - t0)
        times["magic first"].append(t2 - t0)

    def fnb_once():
        t0 = time.perf_counter()
        ex = (
            fnb.DaskExecutor(cpus=CORES, threads=1)
            if kind == "dask"
            else fnb.RayExecutor(cpus=CORES, logging_level="error")
        ).start()
        try:
            t1 = time.perf_counter()
            assert ex.run(one, input={"items": [1]}).result == [2]
            t2 = time.perf_counter()
        finally:
            ex.close()
        times["fnb start"].append(t1 - t0)
        times["fnb first"].append(t2 - t0)

    def raw_once():
        if kind == "dask":
            from distributed import Client, LocalCluster

            t0 = time.perf_counter()
            cluster = LocalCluster(
                n_workers=CORES,
                threads_per_worker=1,
                host="127.0.0.1",
                dashboard_address="127.0.0.1:0",
                processes=True,
                silence_logs=logging.ERROR,
            )
            client = Client(cluster, set_as_default=False)
            try:
                t1 = time.perf_counter()
                assert client.submit(W.inc, 1, pure=False).result() == 2
                t2 = time.perf_counter()
            finally:
                client.close()
                cluster.close()
        else:
            import ray

            t0 = time.perf_counter()
            ray.init(
                num_cpus=CORES,
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                logging_level=logging.ERROR,
                namespace="bench-raw",
            )
            try:
                t1 = time.perf_counter()
                assert ray.get(ray.remote(W.inc).remote(1)) == 2
                t2 = time.perf_counter()
            finally:
                ray.shutdown()
        times["raw start"].append(t1 - t0)
        times["raw first"].append(t2 - t0)

    order = [fnb_once, raw_once, nowait_once, magic_once]
    for rep in range(cfg["startup_reps"]):
        for f in order[rep % len(order) :] + order[: rep % len(order)]:
            f()
            settle()
    engine = "LocalCluster()+Client()" if kind == "dask" else "ray.init()"
    res.add(
        "startup",
        "start(wait=False) returns",
        kind,
        median(times["nowait start"]),
        median(times["raw start"]),
        engine,
        target=None,
        samples={"fnb": times["nowait start"], "baseline": times["raw start"]},
        note="time to interactive: the call returns, the start goes on in a thread",
    )
    res.add(
        "startup",
        "%flowdapt executor --no-wait returns",
        kind,
        median(times["magic start"]),
        median(times["raw start"]),
        engine,
        target=None,
        samples={"fnb": times["magic start"], "baseline": times["raw start"]},
        note="time to interactive of the magic (IPython shell, no kernel)",
    )
    res.add(
        "startup",
        "start(wait=False) to first task result",
        kind,
        median(times["nowait first"]),
        median(times["raw first"]),
        engine,
        target=1.05,
        samples={"fnb": times["nowait first"], "baseline": times["raw first"]},
    )
    res.add(
        "startup",
        "start() returns",
        kind,
        median(times["fnb start"]),
        median(times["raw start"]),
        engine,
        target=None,
        samples={"fnb": times["fnb start"], "baseline": times["raw start"]},
    )
    res.add(
        "startup",
        "start to first task result",
        kind,
        median(times["fnb first"]),
        median(times["raw first"]),
        engine,
        target=None,
        samples={"fnb": times["fnb first"], "baseline": times["raw first"]},
    )


def _ipython():
    """An IPython shell with the flowdapt_nb magics (made once per process)."""
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    if "flowdapt_nb" not in shell.extension_manager.loaded:
        shell.extension_manager.load_extension("flowdapt_nb")
    return shell


# --- processes we started ---------------------------------------------------------------------


def _children():
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "resource_tracker" in " ".join(p.cmdline()):
                continue  # multiprocessing's own helper; it ends with this interpreter
            out.append(p)
        except psutil.Error:
            pass
    return out


def settle(timeout: float = 20.0) -> None:
    """Wait until what the last step started has exited (Ray and Dask stop asynchronously)."""
    deadline = time.monotonic() + timeout
    while _children() and time.monotonic() < deadline:
        time.sleep(0.2)


def reap() -> list[str]:
    """End anything of ours still running (our own children only) and say what it was."""
    settle()
    left = _children()
    names = []
    for p in left:
        try:
            names.append(f"{p.pid} {' '.join(p.cmdline()[:3])}")
            p.terminate()
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=5)
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            pass
    return names


# --- output -----------------------------------------------------------------------------------

HEADER = [
    "section",
    "case",
    "backend",
    "flowdapt_nb",
    "baseline",
    "baseline is",
    "ratio",
    "target",
    "cpu ratio",
]


def table_rows(rows):
    for r in rows:
        target = r["target_text"]
        mark = "" if r["ok"] is None else (" ok" if r["ok"] else " MISS")
        yield [
            r["section"],
            r["case"],
            r["backend"],
            _fmt(r["flowdapt_nb"], r["unit"]),
            _fmt(r["baseline"], r["unit"]),
            r["baseline_name"],
            _fmt_ratio(r["ratio"]),
            target + mark,
            _fmt_ratio(r["cpu_ratio"]),
        ]


def markdown(rows) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(rows)]
    return "\n".join(lines)


def plain(rows) -> str:
    cells = [HEADER] + list(table_rows(rows))
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
    return "\n".join("  ".join(c[i].ljust(widths[i]) for i in range(len(HEADER))).rstrip() for c in cells)


def write(out: Path, size: str, meta: dict, rows: list) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"bench-{size}.json", out / f"bench-{size}.csv", out / f"bench-{size}.md"]
    paths[0].write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str) + "\n")
    with paths[1].open("w", newline="") as f:
        fields = [
            "section",
            "case",
            "backend",
            "flowdapt_nb",
            "baseline",
            "baseline_name",
            "unit",
            "ratio",
            "target",
            "target_text",
            "ok",
            "cpu_flowdapt_nb",
            "cpu_baseline",
            "cpu_ratio",
            "note",
        ]
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    notes = "\n".join(f"- {r['section']} / {r['backend']}: {r['note']}" for r in rows if r["note"])
    paths[2].write_text(f"{_meta_line(meta)}\n\n{markdown(rows)}\n\n{notes}\n")
    return paths


def _meta_line(meta):
    return (
        f"size {meta['size']}, {meta['reps']} reps (medians), {meta['cpus']} cores, {meta['memory_gb']} GB, "
        f"Python {meta['python']}, ray {meta.get('ray')}, distributed {meta.get('distributed')}, "
        f"load before {meta['load_before']}, {meta['date']}"
    )


# --- main -------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", choices=list(SIZES), default="small")
    p.add_argument(
        "--backends",
        default=",".join(BACKENDS),
        help=f"comma-separated, from {','.join(BACKENDS)} (default: all)",
    )
    p.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated, from {','.join(SECTIONS)} (default: all)",
    )
    p.add_argument("--reps", type=int, default=None, help="repetitions per row (default: by size)")
    p.add_argument("--out", default=str(HERE / "results"), help="directory for bench-SIZE.{csv,json,md}")
    args = p.parse_args(argv)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    for b in args.backends:
        if b not in BACKENDS:
            p.error(f"unknown backend {b!r}; choose from {', '.join(BACKENDS)}")
    for s in args.sections:
        if s not in SECTIONS:
            p.error(f"unknown section {s!r}; choose from {', '.join(SECTIONS)}")
    return args


def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through every finally: clusters closed, processes reaped


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    cfg = dict(SIZES[args.size])
    if args.reps:
        cfg["reps"] = args.reps
    ray_tmp = tempfile.mkdtemp(prefix="fnb-bench-ray-")
    os.environ.setdefault("RAY_TMPDIR", ray_tmp)
    # the run store stays on (it is part of a run's cost), writing to a temp file, not the user's
    os.environ.setdefault("FLOWDAPT_NB_RUNS", os.path.join(ray_tmp, "runs.sqlite"))
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    cfg["rounds"], cfg["t_item"] = W.calibrate_rounds(cfg["tp_seconds"])
    cfg["dag_rounds"], cfg["dag_t_item"] = W.calibrate_rounds(cfg["dag_seconds"])
    log(
        f"size {args.size}: {cfg['tp_seconds'] * 1000:.0f} ms of PBKDF2 = {cfg['rounds']} rounds "
        f"(measured {cfg['t_item'] * 1000:.1f} ms); backends {','.join(args.backends)}"
    )

    res = Results()
    failures = []
    try:
        for kind in args.backends:
            main_sections = [s for s in args.sections if s != "startup"]
            if main_sections:
                log(f"{kind}: starting")
                bench = BENCHES[kind](cfg)
                try:
                    bench.start()
                    _warm(bench)
                    for name in main_sections:
                        log(f"{kind}: {name}")
                        try:
                            globals()[f"sec_{name}"](bench, res, cfg)
                        except Exception as exc:
                            failures.append(f"{kind}/{name}: {type(exc).__name__}: {exc}")
                            log(f"  FAILED {kind}/{name}: {type(exc).__name__}: {exc}")
                finally:
                    bench.close()
                    settle()
            if "startup" in args.sections and kind in ("dask", "ray"):
                log(f"{kind}: startup")
                try:
                    sec_startup(kind, res, cfg)
                except Exception as exc:
                    failures.append(f"{kind}/startup: {type(exc).__name__}: {exc}")
                    log(f"  FAILED {kind}/startup: {type(exc).__name__}: {exc}")
    finally:
        leftovers = reap()
        shutil.rmtree(ray_tmp, ignore_errors=True)

    meta = dict(
        size=args.size,
        reps=cfg["reps"],
        startup_reps=cfg["startup_reps"],
        backends=args.backends,
        sections=args.sections,
        cpus=os.cpu_count(),
        memory_gb=round(psutil.virtual_memory().total / 2**30),
        python=platform.python_version(),
        load_before=round(load_before, 2) if load_before else None,
        load_after=round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        config={k: v for k, v in cfg.items()},
        failures=failures,
        leftovers=leftovers,
    )
    for mod in ("ray", "distributed"):
        if mod in sys.modules:
            meta[mod] = getattr(sys.modules[mod], "__version__", None)
    paths = write(Path(args.out), args.size, meta, res.rows)
    print(_meta_line(meta))
    print(plain(res.rows))
    print("\nwrote " + ", ".join(str(p) for p in paths))
    if leftovers:
        print(f"ended processes left running: {', '.join(leftovers)}", file=sys.stderr)
    if failures:
        print("FAILED: " + "; ".join(failures), file=sys.stderr)
        return 1
    return 0


def _warm(bench: Bench) -> None:
    """Start worker processes and import what the stages need, on both paths, before timing."""
    wf = map_workflow("warm", W.inc)
    items = list(range(4 * CORES))
    bench.run(wf, {"items": items})
    bench.raw_map(W.inc, items)
    if bench.kind in ("dask", "ray"):
        bench.run(data_workflow(), {"mb": 1})
        bench.raw_data(1)


if __name__ == "__main__":
    sys.exit(main())
