"""``flowdapt-nb run`` and ``flowdapt-nb validate``: the same YAML, headless."""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

from .errors import ConfigError, RunTimeoutError, StageError


from .run_input import input_from_args, parse_assignments  # noqa: F401  (parse_assignments: kept importable here)


def _jsonable(value) -> str:
    try:
        return json.dumps(value, default=_fallback)
    except (TypeError, ValueError):
        return repr(value)


def _fallback(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    raise TypeError


def _kind_of(path: str) -> str:
    from .yamlsrc import read_source
    data = read_source(path).data
    if isinstance(data, dict) and (str(data.get("kind", "")).lower() == "workflow" or "stages" in data
                                   or "spec" in data):
        return "workflow"
    return "config"


def cmd_validate(args) -> int:
    from .config import executor_from_config
    from .workflow import load_workflow
    status = 0
    for path in args.files:
        try:
            if not Path(path).is_file():
                raise ConfigError(f"file not found: {path}")
            kind = _kind_of(path)
            if kind == "workflow":
                wf = load_workflow(path)
                if args.resolve:
                    wf.resolve()
                print(f"{path}: ok (workflow '{wf.name}', {len(wf.stages)} stage(s))")
            else:
                ex = executor_from_config(path)
                print(f"{path}: ok ({ex.kind} executor config)")
        except ConfigError as exc:
            print(f"error: {path}: {exc}", file=sys.stderr)
            status = 1
    return status


def cmd_run(args) -> int:
    from .config import executor_from_config
    from .executors.local import LocalExecutor
    from .workflow import load_workflow
    if args.path:
        for extra in args.path:
            sys.path.insert(0, str(Path(extra).resolve()))
    sys.path.insert(0, str(Path(args.workflow).resolve().parent))
    try:
        run_input = input_from_args(args.input, args.input_json)  # the one run-input parser
        for what, path in (("workflow", args.workflow), ("config", args.config)):
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"{what} file not found: {path}")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:  # the file goes first in these errors: each has its own line numbers
        where = args.workflow
        wf = load_workflow(Path(args.workflow))
        where = args.config
        ex = executor_from_config(Path(args.config)) if args.config else LocalExecutor()
    except ConfigError as exc:
        print(f"error: {exc}" if str(where) in str(exc) else f"error: {where}: {exc}", file=sys.stderr)
        return 2
    try:
        ex.start()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ConnectionError, OSError, TimeoutError, RuntimeError) as exc:  # unreachable address, ...
        print(f"error: could not start the {ex.kind} executor: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    try:
        with ex:
            run = ex.run(wf, input=run_input, namespace=args.namespace, timeout=args.timeout)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except StageError as exc:
        print(f"error: run failed: {exc}", file=sys.stderr)
        return 1
    except RunTimeoutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: cancelled", file=sys.stderr)
        return 130
    for f in run.failures:
        print(f"warning: stage '{f.stage}' dropped item {f.item}: {f.error}", file=sys.stderr)
    print(_jsonable(run.result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowdapt-nb", description="Run Flowdapt workflows headless.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a workflow and print its result (JSON where it can)")
    run.add_argument("workflow", help="workflow resource YAML file")
    run.add_argument("--config", "-c", help="executor config YAML (default: local executor)")
    run.add_argument("--input", "-i", action="append", metavar="KEY=VALUE", help="run input (repeatable)")
    run.add_argument("--input-json", help="run input as a JSON object")
    run.add_argument("--namespace", "-n", default=None)
    run.add_argument("--timeout", type=float, default=None, help="seconds before the run is failed")
    run.add_argument("--path", action="append", help="extra folder to import stage targets from")
    run.set_defaults(func=cmd_run)
    val = sub.add_parser("validate", help="check config and workflow files")
    val.add_argument("files", nargs="+")
    val.add_argument("--resolve", action="store_true", help="also import every stage target")
    val.set_defaults(func=cmd_validate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception:  # pragma: no cover - an internal fault still says what happened
        traceback.print_exc()
        return 3


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
