"""``flowdapt-nb runs`` and ``flowdapt-nb show UID``: the run store from a shell."""

from __future__ import annotations

import argparse
import json
import sys

from .states import RUN_TERMINAL
from .units import fmt_duration

NOT_FOUND = 2  # like a usage error: the uid (or the database) given is not there


def add_commands(sub) -> None:
    """Add the run store's subcommands to the CLI's subparsers."""
    runs = sub.add_parser(
        "runs",
        help="stored runs, newest first (every process's, earlier ones too)",
        description="Stored runs, newest first: this machine's notebooks, scripts and "
        "CLI runs recorded in the run store. A run whose process ended "
        "mid-run shows as 'lost'.",
    )
    runs.add_argument("--workflow", "-w", help="only this workflow's runs")
    runs.add_argument(
        "--state", "-s", help="only runs in this state (finished, failed, cancelled, running, lost)"
    )
    runs.add_argument("--failed", action="store_true", help="only failed and lost runs")
    runs.add_argument("--since", help="only runs started at or after this ISO date/time (UTC unless given)")
    runs.add_argument("--limit", "-n", type=int, default=50, help="at most this many (default 50; 0: all)")
    runs.add_argument(
        "--db", help="the run store's database (default: $FLOWDAPT_NB_RUNS, else the user data dir)"
    )
    runs.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    runs.set_defaults(func=cmd_runs)
    show = sub.add_parser(
        "show",
        help="one stored run: state, timings, stages, failures with tracebacks",
        description="One stored run by uid, a unique uid prefix, or its name.",
    )
    show.add_argument("uid")
    show.add_argument(
        "--db", help="the run store's database (default: $FLOWDAPT_NB_RUNS, else the user data dir)"
    )
    show.add_argument("--tasks", action="store_true", help="also list every task")
    show.add_argument("--json", action="store_true", help="the record as one JSON object")
    show.set_defaults(func=cmd_show)


def cmd_runs(args: argparse.Namespace) -> int:
    from .run_history import runs

    state = ("failed", "lost") if args.failed else args.state
    try:
        frame = runs(
            workflow=args.workflow, state=state, since=args.since, store=args.db, limit=args.limit or None
        )
    except ValueError as exc:
        print(f"flowdapt-nb runs: {exc}", file=sys.stderr)
        return NOT_FOUND
    if args.json:
        for row in frame.to_dict("records"):
            print(json.dumps({k: _plain(v) for k, v in row.items()}))
        return 0
    if frame.empty:
        print("no stored runs" + (" matching" if (args.workflow or state or args.since) else ""))
        return 0
    shown = frame[
        ["uid", "workflow", "state", "executor", "started_at", "duration", "tasks", "failures", "error"]
    ].copy()
    shown["uid"] = shown["uid"].str[:12]
    shown["started_at"] = shown["started_at"].map(_when)
    shown["duration"] = shown["duration"].map(fmt_duration)
    shown["error"] = shown["error"].fillna("").str.slice(0, 60)
    print(shown.to_string(index=False))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from .run_history import load_run

    try:
        run = load_run(args.uid, store=args.db)
    except (KeyError, ValueError) as exc:
        print(f"flowdapt-nb show: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return NOT_FOUND
    if args.json:
        record = {
            **{k: _plain(v) for k, v in run.summary().items()},
            "input": run.input,
            "config": run.config,
            "workflow_hash": run.workflow_hash,
            "workflow_yaml": run.workflow_yaml,
            "result_type": run.result_type,
            "result_bytes": run.result_bytes,
            "stages": run.stage_summaries,
            "failures": [{k: v for k, v in f.items() if k != "exception"} for f in run.failures],
            "error_traceback": run.error_traceback,
            "tasks": [{k: _plain(v) for k, v in r.items()} for r in run.tasks.to_dict("records")],
        }
        print(json.dumps(record))
        return 0
    if run.state in RUN_TERMINAL:
        span = f"took {fmt_duration(run.duration)}"
    elif run.state == "running":
        span = f"running for {fmt_duration(run.duration)}"
    else:  # lost (its process ended mid-run) or not begun: no end to measure to
        span = "no end recorded"
    print(f"run {run.name}  {run.state}  ({span})")
    print(
        f"uid {run.uid}  workflow {run.workflow} ({run.workflow_hash})  executor {run.executor}  "
        f"namespace {run.namespace}"
    )
    print(
        f"started {_when(run.started_at)}  finished {_when(run.finished_at)}  input {json.dumps(run.input)}"
    )
    if run.result_type:
        print(
            f"result: {run.result_type}" + (f", about {run.result_bytes} bytes" if run.result_bytes else "")
        )
    if run.error:
        print(f"error: {run.error}")
    print()
    print(_stage_table(run.stages))
    if args.tasks:
        print()
        print(_task_table(run.tasks))
    for f in run.failures:
        print(f"\ndropped item {f.item} of stage '{f.stage}': {f.error}")
        if f.traceback:
            print(f.traceback.rstrip())
    if run.error_traceback:
        print(f"\nthe error that ended the run:\n{run.error_traceback.rstrip()}")
    return 0


def _when(moment) -> str:
    """A start or end time to the second, in UTC ('–' for none: None or pandas' NaT)."""
    return "–" if moment is None or moment != moment else moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _stage_table(stages) -> str:
    """The stages as a terminal-width table: task counts (queued and running only when a run
    was cut off with some), and the time each took."""
    if stages.empty or "stage" not in stages:
        return "(no stages recorded)"
    counts = ["tasks", "queued", "running", "finished", "failed", "cancelled", "cached"]
    shown = [c for c in counts if c in stages and (c in ("tasks", "finished", "failed") or stages[c].any())]
    table = stages[[c for c in ("stage", "type", "state") if c in stages] + shown].copy()
    if "duration" in stages:
        table["time"] = stages["duration"].map(fmt_duration)
    return table.to_string(index=False)


def _task_table(tasks) -> str:
    """Every task: stage, item (blank for a simple stage's one task), state, worker, time, error."""
    table = tasks[["stage", "item", "state", "worker"]].copy()
    table["item"] = table["item"].astype(object).where(table["item"].notna(), "")
    table["worker"] = table["worker"].fillna("")
    table["time"] = tasks["duration"].map(fmt_duration)
    table["error"] = tasks["error"].fillna("").str.slice(0, 60)
    return table.to_string(index=False)


def _plain(value):
    """A table cell as JSON: timestamps as ISO text, pandas' missing values as null."""
    if value is None:
        return None
    if hasattr(value, "isoformat"):
        return value.isoformat()
    try:
        import pandas as pd

        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return value
