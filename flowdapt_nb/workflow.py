"""Workflows: Flowdapt's workflow resource as models, target resolution, and DAG checks."""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
import re
import sys
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ConfigError
from .yamlsrc import Source, read_source

# \A...\Z, not ^...$: '$' also matches before a trailing newline, so 'stage\n' would pass
NAME_PATTERN = re.compile(r"\A[A-Za-z0-9_-]+\Z")
STAGE_KEYS = (
    "name",
    "target",
    "type",
    "depends_on",
    "options",
    "resources",
    "description",
    "version",
    "priority",
)
OPTION_KEYS = ("allow_partial_failure", "map_on", "timeout", "cache")
MAIN = "__main__"  # the allow-list prefix of functions defined in the notebook (or script)

# Said wherever a user meets workflow files: the CLI's --help, %flowdapt help workflow, README.
TARGETS_ARE_CODE = (
    "A workflow file is code. Each stage's target names a Python callable that is imported and "
    "called with the run's input: 'target: os.system' runs shell commands, and importing a "
    "target's module runs that module's import-time code ('flowdapt-nb validate --resolve' "
    "imports them too). Treat workflow files like Python scripts: run only ones you trust. To "
    "limit what workflows may call, set allowed_targets in the executor config, e.g. "
    "'allowed_targets: [mypkg., __main__]': a stage whose target's import path does not start "
    "with one of these prefixes is refused before anything is imported ('__main__' allows "
    "functions defined in the notebook)."
)
STAGE_TYPES = ("simple", "parameterized")


class Stage(BaseModel):
    """One stage of a workflow.

    >>> Stage("square", "mypkg.square", type="parameterized", depends_on=["numbers"]).type
    'parameterized'
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    name: str
    target: str | Callable | None = None
    type: Literal["simple", "parameterized"] = "simple"
    depends_on: list[str] = Field(default_factory=list)
    options: dict[str, Any] = Field(default_factory=dict)
    resources: dict[str, Any] = Field(default_factory=dict)
    description: str | None = None
    version: str | None = None
    priority: int | None = None

    def __init__(self, name: str | None = None, target=None, /, **fields):
        if name is not None:
            fields["name"] = name
        if target is not None:
            fields["target"] = target
        super().__init__(**fields)

    @property
    def allow_partial_failure(self) -> bool:
        return bool(self.options.get("allow_partial_failure", True))

    @property
    def map_on(self) -> str | None:
        return self.options.get("map_on")

    @property
    def timeout(self) -> float | None:
        return self.options.get("timeout")

    def target_name(self) -> str:
        """The target as text that loads back: a notebook function by its name, anything else by
        import path (``pkg.mod.func``, or ``pkg.mod:Class.method`` for a dotted qualname)."""
        target = self.target
        if isinstance(target, str) or target is None:
            return target or ""
        module, qualname = _module_and_qualname(target)
        if module in (None, MAIN) or "<lambda>" in qualname or "<locals>" in qualname:
            return getattr(target, "__name__", qualname)
        return f"{module}{':' if '.' in qualname else '.'}{qualname}"

    def to_dict(self) -> dict:
        out: dict = {"name": self.name, "target": self.target_name()}
        if self.type != "simple":
            out["type"] = self.type
        if self.depends_on:
            out["depends_on"] = list(self.depends_on)
        if self.options:
            out["options"] = dict(self.options)
        if self.resources:
            out["resources"] = dict(self.resources)
        for key in ("description", "version", "priority"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


class Workflow(BaseModel):
    """A workflow: a named DAG of stages, checked when built.

    >>> wf = Workflow("squares", stages=[Stage("numbers", "builtins.list")])
    >>> wf.to_dict()["metadata"]["name"]
    'squares'
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    name: str
    stages: list[Stage]
    metadata: dict[str, Any] = Field(default_factory=dict)  # annotations, labels, ...

    def __init__(self, name: str | None = None, /, **fields):
        if name is not None:
            fields["name"] = name
        stages = fields.get("stages")
        if isinstance(stages, list):
            fields["stages"] = [Stage(**s) if isinstance(s, dict) else s for s in stages]
        try:
            super().__init__(**fields)
        except ValidationError as exc:
            raise _config_error_from(exc, Source(fields), ()) from None
        check_workflow(self)

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)

    @property
    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages]

    def terminal_stages(self) -> list[Stage]:
        used = {d for s in self.stages for d in s.depends_on}
        return [s for s in self.stages if s.name not in used]

    def to_dict(self) -> dict:
        """The Flowdapt workflow resource."""
        metadata = {"name": self.name, **{k: v for k, v in self.metadata.items() if k != "name"}}
        return {
            "kind": "workflow",
            "metadata": metadata,
            "spec": {"stages": [s.to_dict() for s in self.stages]},
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def resolve(
        self, namespace: dict | None = None, allowed_targets: list[str] | None = None
    ) -> dict[str, Callable]:
        """Resolve every target to a callable and check its signature against the DAG.

        With ``allowed_targets`` (import-path prefixes), every target is checked against it
        before any module is imported."""
        if allowed_targets is not None:
            for stage in self.stages:
                check_target_allowed(stage, allowed_targets)
        return {s.name: resolve_target(s, namespace, allowed_targets) for s in self.stages}

    def __repr__(self) -> str:
        edges = ", ".join(
            f"{s.name}" + (f"<-{'+'.join(s.depends_on)}" if s.depends_on else "") for s in self.stages
        )
        return f"Workflow({self.name!r}: {edges})"

    def _repr_html_(self) -> str:
        from .render import workflow_html

        return workflow_html(self)


# --- the one validator --------------------------------------------------------------------------
# Every rule a workflow must follow lives here, once. It collects problems as data (Problem);
# load_workflow raises them all in one ConfigError, the StageMapper shows each on its stage's row.


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a workflow: what, where (stage, key, YAML line) and what is valid.

    >>> [p.text for p in workflow_problems({"metadata": {"name": "w"},
    ...                                     "spec": {"stages": [{"name": "a", "depends_on": ["b"]}]}})]
    ["has no target; give an import path or a notebook function's name", "depends on unknown stage 'b'; stages: a"]
    """

    message: str
    stage: str | None = None  # the stage's name, when the problem is one stage's
    key: str | None = None  # the key at fault: depends_on, options.map_on, metadata.name, ...
    line: int | None = None  # its YAML line, when the workflow was read from YAML
    hint: str | None = None  # what would be valid
    index: int | None = None  # the stage's position in spec.stages; None: the workflow as a whole
    stages: tuple[int, ...] = ()  # every stage position it concerns, when several (a cycle's)

    @classmethod
    def from_error(cls, exc: ConfigError, index: int | None = None) -> Problem:
        return cls(exc.message, stage=exc.stage, key=exc.key, line=exc.line, hint=exc.hint, index=index)

    def error(self) -> ConfigError:
        return ConfigError(self.message, key=self.key, line=self.line, stage=self.stage, hint=self.hint)

    @property
    def text(self) -> str:
        """The message and what is valid, without line and stage (for a row that shows its stage)."""
        return f"{self.message}; {self.hint}" if self.hint else self.message

    @property
    def positions(self) -> tuple[int, ...]:
        """The stage positions to mark: ``stages``, else ``index``; () for the workflow's own."""
        return self.stages or (() if self.index is None else (self.index,))

    def __str__(self) -> str:
        return str(self.error())


def problems_error(problems: list[Problem]) -> ConfigError:
    """All problems as one ConfigError, in one line: it reads (and carries key, line and stage) as
    the first one, followed by the others; ``.problems`` holds them all."""
    err = problems[0].error()
    if len(problems) > 1:
        rest = " ".join(f"({n}) {p}" for n, p in enumerate(problems[1:], 2))
        err.args = (f"{err} [and {len(problems) - 1} more: {rest}]",)
    err.problems = list(problems)
    return err


def validate_workflow(src, *, namespace: dict | None = None) -> tuple[Workflow | None, list[Problem]]:
    """Check a workflow (a Workflow, YAML text, a path, a dict) against every rule; returns it
    built when there is no problem, and every problem found.

    With ``namespace`` (a dict), each stage's target is also resolved there as a run would
    (importing modules) and its signature checked against the DAG."""
    if isinstance(src, Workflow):
        chk = _Checks(Source(None))
        _check_stages(chk, src.name, list(enumerate(src.stages)), src.stage_names, namespace)
        return (None if chk.problems else src), chk.problems
    try:
        source = read_source(src, "workflow")
    except ConfigError as exc:
        return None, [Problem.from_error(exc)]
    return _validate(source, namespace)


def workflow_problems(src, *, namespace: dict | None = None) -> list[Problem]:
    """Every problem of a workflow, as data (see :func:`validate_workflow`); [] when it is valid."""
    return validate_workflow(src, namespace=namespace)[1]


def check_workflow(wf: Workflow) -> None:
    """Structural checks before any run (names, dependencies, cycles, fan-out inputs); one
    ConfigError listing every problem."""
    problems = workflow_problems(wf)
    if problems:
        raise problems_error(problems)


def _did_you_mean(word, choices, otherwise: str) -> str:
    """``did you mean 'X'?`` for the closest of ``choices``, else ``otherwise`` (what is valid)."""
    near = difflib.get_close_matches(str(word), list(choices), n=1)
    return f"did you mean '{near[0]}'?" if near else otherwise


class _Checks:
    """Problems found so far, each given the YAML line of its key path."""

    prefix = ("spec", "stages")

    def __init__(self, source: Source):
        self.source = source
        self.problems: list[Problem] = []

    def workflow(self, message: str, path: tuple = (), **fields) -> None:
        self.problems.append(Problem(message, line=self.source.line_of(path), **fields))

    def stage(self, i: int, stage, message: str, *path, **fields) -> None:
        line = self.source.line_of(self.prefix + (i, *path))
        self.problems.append(Problem(message, stage=stage, line=line, index=i, **fields))


def _validate(source: Source, namespace: dict | None = None) -> tuple[Workflow | None, list[Problem]]:
    source = _expand_shorthand(source)
    chk = _Checks(source)
    raw_stages = _document_problems(source.data, chk)
    if raw_stages is None:
        return None, chk.problems
    built = [
        (i, stage) for i, raw in enumerate(raw_stages) if (stage := _stage_from_raw(i, raw, chk)) is not None
    ]
    names = [raw["name"] for raw in raw_stages if isinstance(raw, dict) and isinstance(raw.get("name"), str)]
    metadata = source.data.get("metadata") or {}
    name = str(metadata["name"]) if isinstance(metadata, dict) and "name" in metadata else None
    _check_stages(chk, name, built, names, namespace, count=len(raw_stages))
    if chk.problems:
        return None, chk.problems
    extra_meta = {k: v for k, v in metadata.items() if k != "name"}
    return Workflow.model_construct(name=name, stages=[s for _, s in built], metadata=extra_meta), []


def _expand_shorthand(source: Source) -> Source:
    """``{name, stages}`` (a notebook cell's shorthand) as the full resource, lines kept."""
    data = source.data
    if not (isinstance(data, dict) and "spec" not in data and "stages" in data):
        return source
    data = {"kind": "workflow", "metadata": {"name": data.get("name")}, "spec": {"stages": data["stages"]}}
    return Source(
        data,
        {("spec",) + k if k[0] == "stages" else k: v for k, v in source.lines.items()},
        source.origin,
        source.line_offset,
    )


_TOP_KEYS = ("kind", "metadata", "spec", "version", "api_version", "apiVersion", "status")
_EXECUTOR_KEYS = ("target", "__target__", "services")


def _document_problems(data, chk: _Checks) -> list | None:
    """The resource's own keys; returns its stages as given, or None when there are none to check."""
    if not isinstance(data, dict):
        chk.workflow("a workflow must be a mapping with kind, metadata and spec")
        return None
    if "spec" not in data and any(k in data for k in _EXECUTOR_KEYS):
        key = next(k for k in _EXECUTOR_KEYS if k in data)
        chk.workflow(
            "this is an executor config, not a workflow",
            (key,),
            key=key,
            hint="a workflow resource has kind: workflow, metadata.name and spec.stages",
        )
        return None
    for key in data:
        if key not in _TOP_KEYS:
            hint = _did_you_mean(key, ["kind", "metadata", "spec"], "valid: kind, metadata, spec")
            chk.workflow(f"unknown key '{key}' in the workflow", (key,), key=str(key), hint=hint)
    kind = data.get("kind", "workflow")
    if str(kind).lower() != "workflow":
        chk.workflow(f"kind is {kind!r}; a workflow resource has kind: workflow", ("kind",), key="kind")
        return None
    metadata = data.get("metadata") or {}
    if not isinstance(metadata, dict) or "name" not in metadata:
        chk.workflow("the workflow needs metadata.name", ("metadata",), key="metadata.name")
    return _spec_stages(data.get("spec"), chk)


def _spec_stages(spec, chk: _Checks) -> list | None:
    for key in spec if isinstance(spec, dict) else ():
        if key != "stages":
            hint = _did_you_mean(key, ["stages"], "a workflow spec holds only 'stages'")
            chk.workflow(f"unknown key 'spec.{key}'", ("spec", key), key=f"spec.{key}", hint=hint)
    if not isinstance(spec, dict) or "stages" not in spec:
        chk.workflow("the workflow needs spec.stages, a list of stages", ("spec",), key="spec.stages")
        return None
    if not isinstance(spec["stages"], list):
        chk.workflow(
            "spec.stages must be a list of stages (each starting with '- name:')",
            ("spec", "stages"),
            key="spec.stages",
        )
        return None
    return spec["stages"]


def _stage_from_raw(i: int, raw, chk: _Checks) -> Stage | None:
    """One stage as given (a mapping) checked for its keys and their types, then built."""
    if not isinstance(raw, dict):
        chk.stage(i, None, f"stage {i + 1} must be a mapping with name and target")
        return None
    name = raw.get("name")
    found = len(chk.problems)
    for key in raw:
        if key not in STAGE_KEYS:
            hint = _did_you_mean(key, STAGE_KEYS, "valid keys: " + ", ".join(STAGE_KEYS))
            chk.stage(i, name, f"unknown key '{key}'", key, key=str(key), hint=hint)
    deps = raw.get("depends_on", [])
    if isinstance(deps, str):
        chk.stage(
            i, name, f"depends_on must be a list, e.g. depends_on: [{deps}]", "depends_on", key="depends_on"
        )
    if raw.get("type", "simple") not in STAGE_TYPES:
        chk.stage(
            i, name, f"type {raw.get('type')!r} is not valid; use simple or parameterized", "type", key="type"
        )
    target = raw.get("target", "")
    if not isinstance(target, str) and not callable(target):  # Flowdapt's API takes callables too
        chk.stage(
            i,
            name,
            f"target must be an import path, a notebook function's name or a callable, "
            f"not {type(target).__name__}",
            "target",
            key="target",
        )
    if len(chk.problems) > found:
        return None
    try:
        return Stage(**{k: v for k, v in raw.items() if v is not None or k == "target"})
    except ValidationError as exc:
        chk.problems += _validation_problems(exc, chk.source, chk.prefix + (i,), stage=name, index=i)
        return None


def _validation_problems(
    exc: ValidationError, source: Source, path: tuple, stage=None, index: int | None = None
) -> list[Problem]:
    out = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc)
        out.append(
            Problem(
                f"'{key}': {err['msg'].removeprefix('Value error, ')}",
                stage=stage,
                key=key,
                line=source.line_of(path + loc),
                index=index,
            )
        )
    return out


def _config_error_from(exc: ValidationError, source: Source, prefix, stage: str | None = None) -> ConfigError:
    return _validation_problems(exc, source, tuple(prefix), stage)[0].error()


def _check_stages(
    chk: _Checks,
    name,
    built: list[tuple[int, Stage]],
    names: list[str],
    namespace: dict | None = None,
    count: int | None = None,
) -> None:
    """The rules on built stages: names, targets, options, resources, dependencies, cycles, and
    (with a namespace) the targets resolved."""
    if name is not None and (not isinstance(name, str) or not NAME_PATTERN.fullmatch(name)):
        chk.workflow(
            f"workflow name {name!r} is not valid: use letters, digits, '_' and '-'",
            ("metadata", "name"),
            key="metadata.name",
        )
    if (len(built) if count is None else count) == 0:
        chk.workflow(
            f"workflow '{name}' has no stages; give at least one under spec.stages",
            ("spec",),
            key="spec.stages",
        )
    first: dict[str, int] = {}
    for i, stage in built:
        _stage_problems(i, stage, first, chk)
    known = dict.fromkeys(names)  # in order, and found in O(1): workflows may have many stages
    for i, stage in built:
        _dependency_problems(i, stage, known, chk)
    _cycle_problems(built, chk)
    if namespace is not None:
        _target_problems(built, namespace, chk)


def _stage_problems(i: int, stage: Stage, first: dict[str, int], chk: _Checks) -> None:
    name = stage.name
    if not NAME_PATTERN.fullmatch(name):
        chk.stage(i, None, f"stage name {name!r} is not valid: use letters, digits, '_' and '-'", key="name")
    elif name in first:
        chk.stage(
            i,
            name,
            f"duplicate stage name '{name}' (stage {first[name] + 1} has it too)",
            hint=f"stage names must be unique: rename it or the other stage also named '{name}'",
        )
    else:
        first[name] = i
    if stage.target is None or stage.target == "":
        chk.stage(
            i, name, "has no target", key="target", hint="give an import path or a notebook function's name"
        )
    _option_problems(i, stage, chk)
    _resource_problems(i, stage, chk)


def _bad_timeout(value) -> bool:
    if value is None:
        return False
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return True
    return not math.isfinite(value) or value <= 0


def _option_problems(i: int, stage: Stage, chk: _Checks) -> None:
    for key in stage.options:
        if key not in OPTION_KEYS:
            hint = _did_you_mean(key, OPTION_KEYS, "valid options: " + ", ".join(OPTION_KEYS))
            chk.stage(
                i, stage.name, f"unknown option '{key}'", "options", key, key=f"options.{key}", hint=hint
            )
    apf = stage.options.get("allow_partial_failure", True)
    if not isinstance(apf, bool):
        chk.stage(
            i,
            stage.name,
            f"options.allow_partial_failure must be true or false, got {apf!r}",
            "options",
            "allow_partial_failure",
            key="options.allow_partial_failure",
        )
    map_on = stage.options.get("map_on")
    if map_on is not None and (not isinstance(map_on, str) or not map_on):
        chk.stage(
            i,
            stage.name,
            f"options.map_on must name a key of the run input (a string), got {map_on!r}",
            "options",
            "map_on",
            key="options.map_on",
        )
    timeout = stage.options.get("timeout")
    if _bad_timeout(timeout):
        chk.stage(
            i,
            stage.name,
            f"options.timeout must be a positive number of seconds, got {timeout!r}",
            "options",
            "timeout",
            key="options.timeout",
        )


def _resource_problems(i: int, stage: Stage, chk: _Checks) -> None:
    from .units import parse_bytes

    for name, amount in stage.resources.items():
        if name == "memory":
            try:
                parse_bytes(amount)
            except ValueError as exc:
                chk.stage(i, stage.name, f"resources.memory: {exc}", "resources", key="resources.memory")
        elif isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount < 0:
            chk.stage(
                i,
                stage.name,
                f"resources.{name} must be a non-negative number, got {amount!r}",
                "resources",
                key=f"resources.{name}",
            )


def _dependency_problems(i: int, stage: Stage, names: dict[str, None], chk: _Checks) -> None:
    for dep in stage.depends_on:
        if dep == stage.name:
            chk.stage(i, stage.name, "depends on itself", "depends_on", key="depends_on")
        elif dep not in names:
            hint = _did_you_mean(dep, names, "stages: " + ", ".join(names))
            chk.stage(
                i, stage.name, f"depends on unknown stage '{dep}'", "depends_on", key="depends_on", hint=hint
            )
    if len(set(stage.depends_on)) != len(stage.depends_on):
        chk.stage(i, stage.name, "lists a dependency twice in depends_on", "depends_on")
    if stage.type == "parameterized" and not stage.depends_on and not stage.map_on:
        chk.stage(
            i,
            stage.name,
            "is parameterized with no dependency: set options.map_on to the input key whose "
            "list it maps over",
            key="options.map_on",
        )


def _cycle_problems(built: list[tuple[int, Stage]], chk: _Checks) -> None:
    """Every dependency cycle, reported once on its first stage and marking all of its stages."""
    position: dict[str, int] = {}
    for i, stage in built:
        position.setdefault(stage.name, i)
    deps = {s.name: [d for d in s.depends_on if d in position and d != s.name] for _, s in built}
    for cycle in _cycles(deps):
        chk.stage(
            position[cycle[0]],
            cycle[0],
            "dependency cycle " + " -> ".join(cycle),
            "depends_on",
            key="depends_on",
            stages=tuple(position[n] for n in cycle[:-1]),
        )


def _cycles(deps: dict[str, list[str]]) -> list[list[str]]:
    """The cycles a depth-first search meets (each once, as a -> b -> a), in the order met.
    Iterative: a long chain of stages must not reach Python's recursion limit."""
    found: list[list[str]] = []
    keys: set[frozenset] = set()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in deps:
        if root in state:
            continue
        state[root] = 1
        path, todo = [root], [iter(deps.get(root, []))]
        while todo:
            dep = next(todo[-1], None)
            if dep is None:  # this node's dependencies are all seen
                state[path.pop()] = 2
                todo.pop()
            elif state.get(dep) == 1:
                cycle = path[path.index(dep) :] + [dep]
                if frozenset(cycle) not in keys:
                    keys.add(frozenset(cycle))
                    found.append(cycle)
            elif dep not in state:
                state[dep] = 1
                path.append(dep)
                todo.append(iter(deps.get(dep, [])))
    return found


def _target_problems(built: list[tuple[int, Stage]], namespace: dict, chk: _Checks) -> None:
    for i, stage in built:
        if stage.target is None or stage.target == "":
            continue  # said already: has no target
        try:
            resolve_target(stage, namespace)
        except ConfigError as exc:
            chk.stage(i, stage.name, exc.message, "target", key=exc.key, hint=exc.hint)


def topological_order(wf: Workflow) -> list[str]:
    done: list[str] = []
    remaining = {s.name: set(s.depends_on) for s in wf.stages}
    while remaining:
        ready = [n for n, d in remaining.items() if d <= set(done)]
        done.extend(ready)
        for n in ready:
            del remaining[n]
    return done


# --- loading ------------------------------------------------------------------------------------


def load_workflow(src) -> Workflow:
    """Load a Flowdapt workflow resource from YAML text, a path, or a dict; a ConfigError lists
    every problem (see :func:`workflow_problems`).

    >>> wf = load_workflow('''
    ... kind: workflow
    ... metadata: {name: demo}
    ... spec:
    ...   stages:
    ...     - {name: a, target: builtins.dict}
    ... ''')
    >>> wf.stage_names
    ['a']
    """
    if isinstance(src, Workflow):
        return src
    wf, problems = _validate(read_source(src, "workflow"))
    if problems or wf is None:
        raise problems_error(problems)
    return wf


# --- targets ------------------------------------------------------------------------------------


def user_namespace() -> dict:
    """The notebook's namespace when IPython runs, else ``__main__``'s."""
    ipython_mod = sys.modules.get("IPython")
    if ipython_mod is not None:
        shell = ipython_mod.get_ipython()
        if shell is not None:
            return shell.user_ns
    main = sys.modules.get("__main__")
    return vars(main) if main is not None else {}


def resolve_target(
    stage: Stage, namespace: dict | None = None, allowed_targets: list[str] | None = None
) -> Callable:
    """A stage's callable: the callable itself, a notebook function by name, or an import path.
    With ``allowed_targets``, a target outside those prefixes is refused before it is imported."""
    target = stage.target
    if allowed_targets is not None:
        check_target_allowed(stage, allowed_targets)
    if callable(target):
        fn = target
    else:
        fn = _lookup(stage, str(target), namespace)
        if allowed_targets is not None and _is_notebook_name(str(target)):
            # a notebook name may hold anything (``from os import system``): what it holds must be
            # defined in the notebook or come from an allowed module
            _refuse_unless_allowed(
                stage,
                callable_path(fn),
                allowed_targets,
                f"'{target}' in the notebook is {callable_path(fn)}, which",
            )
    check_signature(stage, fn)
    return fn


# --- allowed targets ------------------------------------------------------------------------------

_PREFIX = re.compile(r"\A[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\.?\Z")


def check_allowed_prefixes(value) -> list[str] | None:
    """``allowed_targets`` as given in a config: None (anything) or a list of import-path
    prefixes such as ``mypkg.`` or ``__main__``; raises ValueError saying what is valid."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError(
            f"allowed_targets must be a list of import-path prefixes such as "
            f"[mypkg., __main__], got {value!r}"
        )
    for prefix in value:
        if not isinstance(prefix, str) or not _PREFIX.fullmatch(prefix):
            raise ValueError(
                f"allowed_targets holds {prefix!r}: each entry is an import-path prefix "
                f"such as mypkg. or mypkg.models or __main__"
            )
    return list(value)


def _module_and_qualname(fn) -> tuple[str | None, str]:
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    if not isinstance(qualname, str):  # a callable instance: named by its class
        qualname = type(fn).__qualname__
        module = type(fn).__module__
    return module, qualname


def callable_path(fn) -> str:
    """The import path an allow-list checks for a callable: ``pkg.mod.func``, or
    ``__main__.func`` for a function defined in the notebook or script."""
    module, qualname = _module_and_qualname(fn)
    return f"{module or MAIN}.{qualname}"


def _is_notebook_name(target: str) -> bool:
    return "." not in target and ":" not in target


def target_path(target) -> str:
    """The import path of a target as written: ``pkg.mod:func`` -> ``pkg.mod.func``, a bare name
    (a notebook function) -> ``__main__.name``, a callable -> :func:`callable_path`."""
    if callable(target) and not isinstance(target, str):
        return callable_path(target)
    text = str(target)
    return f"{MAIN}.{text}" if _is_notebook_name(text) else text.replace(":", ".")


def is_allowed(path: str, allowed_targets) -> bool:
    """``mypkg.`` and ``mypkg`` allow mypkg and its submodules (not ``mypkg_other``);
    ``mypkg.train`` allows that name and what is below it."""
    for prefix in allowed_targets:
        if prefix.endswith("."):
            if path.startswith(prefix):
                return True
        elif path == prefix or path.startswith(prefix + "."):
            return True
    return False


def _refuse_unless_allowed(stage: Stage, path: str, allowed_targets, what: str) -> None:
    if not is_allowed(path, allowed_targets):
        allowed = ", ".join(allowed_targets) if allowed_targets else "nothing (the list is empty)"
        raise ConfigError(
            f"target {what} is not allowed: allowed_targets permits only {allowed}",
            stage=stage.name,
            key="target",
            hint="add a prefix of it to allowed_targets in the executor config if you trust that code",
        )


def check_target_allowed(stage: Stage, allowed_targets) -> None:
    """Refuse a stage whose target is outside ``allowed_targets``, without importing anything."""
    target = stage.target
    path = target_path(target)
    if not isinstance(target, str):
        shown = path
    elif target.replace(":", ".") == path:
        shown = f"'{target}'"
    else:
        shown = f"'{target}' ({path})"
    _refuse_unless_allowed(stage, path, allowed_targets, shown)


def _lookup(stage: Stage, target: str, namespace: dict | None) -> Callable:
    ns = user_namespace() if namespace is None else namespace
    if target in ns and callable(ns[target]):
        return ns[target]
    module_name, sep, attr = target.replace(":", ".").rpartition(".")
    if not sep:
        defined = sorted(k for k, v in ns.items() if inspect.isfunction(v) and not k.startswith("_"))
        near = difflib.get_close_matches(target, defined, n=1)
        hint = (
            f"did you mean '{near[0]}'?"
            if near
            else "define the function in the notebook first, or give an import path like mypkg.module.func"
        )
        raise ConfigError(
            f"target '{target}' is neither a function defined in the notebook nor an import path",
            stage=stage.name,
            key="target",
            hint=hint,
        )
    if ":" in target:
        module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"target '{target}' does not import: {exc}",
            stage=stage.name,
            key="target",
            hint="check the module path and that its package is installed",
        ) from None
    except Exception as exc:
        raise ConfigError(
            f"target '{target}': importing {module_name} raised {type(exc).__name__}: {exc}",
            stage=stage.name,
            key="target",
            hint=f"fix {module_name} so it imports, or name a target in another module",
        ) from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n, None))]
            near = difflib.get_close_matches(part, names, n=1)
            hint = (
                f"did you mean '{target[: len(target) - len(attr)]}{near[0]}'?"
                if near and "." not in attr
                else f"did you mean '{near[0]}'?"
                if near
                else f"{module_name} defines: {', '.join(names[:12]) or 'nothing callable'}"
            )
            raise ConfigError(
                f"target '{target}' does not import: {module_name} has no attribute '{attr}'",
                stage=stage.name,
                key="target",
                hint=hint,
            ) from None
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(
            f"target '{target}' is not callable ({type(obj).__name__})",
            stage=stage.name,
            key="target",
            hint="name a function (or another callable) defined in the module",
        )
    return obj


def positional_count(stage: Stage) -> int:
    """How many positional arguments the stage's function is called with."""
    return len(stage.depends_on) if stage.depends_on else (1 if stage.type == "parameterized" else 0)


_signatures: dict = {}  # id(function) -> (weakref to it, what its signature depends on, signature)


def signature_of(fn: Callable) -> inspect.Signature:
    """``inspect.signature``, kept per plain function: every run checks its stages' signatures,
    and building one costs more than a tiny run's own work. Redefining the function (a new
    object) or changing its defaults or code is seen; other callables are inspected each time."""
    if type(fn) is not types.FunctionType:
        return inspect.signature(fn)
    stamp = (
        fn.__code__,
        fn.__defaults__,
        fn.__kwdefaults__,
        fn.__dict__.get("__signature__"),
        fn.__dict__.get("__wrapped__"),
        fn.__annotations__,
    )
    cached = _signatures.get(id(fn))
    if cached is not None and cached[0]() is fn and all(a is b for a, b in zip(cached[1], stamp)):
        return cached[2]
    sig = inspect.signature(fn)
    if len(_signatures) > 2048:  # notebooks redefine functions: forget the oldest
        for key in list(_signatures)[:1024]:
            del _signatures[key]
    _signatures[id(fn)] = (weakref.ref(fn), stamp, sig)
    return sig


def check_signature(stage: Stage, fn: Callable) -> None:
    try:
        sig = signature_of(fn)
    except (TypeError, ValueError):
        return  # builtins without a signature: checked when called
    count = positional_count(stage)
    if count == 0:
        return
    try:
        sig.bind_partial(*([None] * count))
    except TypeError:
        what = f"depends on {', '.join(stage.depends_on)}" if stage.depends_on else "maps over a list"
        takes = sum(
            1 for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        )
        raise ConfigError(
            f"its function {getattr(fn, '__name__', fn)}{sig} takes {takes} positional "
            f"argument(s) but {what}, so it is called with {count}",
            stage=stage.name,
            key="target",
            hint=f"give it {count} parameter(s), one per dependency output",
        ) from None
    missing = [
        p.name
        for i, p in enumerate(sig.parameters.values())
        if i >= count
        and p.default is p.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and stage.depends_on
    ]
    if missing:
        raise ConfigError(
            f"its function {getattr(fn, '__name__', fn)}{sig} needs argument(s) "
            f"{', '.join(missing)} that no dependency supplies",
            stage=stage.name,
            key="target",
            hint=f"give {', '.join(missing)} a default, or add a dependency for each",
        )


def root_kwargs(stage: Stage, fn: Callable, run_input: dict) -> dict:
    """The run input filtered to a root stage's signature; a missing required argument is an error."""
    run_input = run_input or {}
    skip = {stage.map_on} if stage.type == "parameterized" else set()
    try:
        sig = signature_of(fn)
    except (TypeError, ValueError):
        return {}
    params = list(sig.parameters.values())
    if stage.type == "parameterized" and params:
        params = params[1:]  # the first parameter receives the item
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return {k: v for k, v in run_input.items() if k not in skip}
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    missing = [
        p.name
        for p in params
        if p.default is p.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.name not in run_input
    ]
    if missing:
        have = ", ".join(sorted(run_input)) or "none"
        raise ConfigError(
            f"needs input {', '.join(repr(m) for m in missing)} (input keys given: {have})",
            stage=stage.name,
            key=missing[0],
            hint=f"pass it in the run input, e.g. input={{'{missing[0]}': ...}}",
        )
    return {k: v for k, v in run_input.items() if k in names and k not in skip}
