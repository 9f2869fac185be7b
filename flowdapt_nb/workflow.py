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
from typing import Any, Callable, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ConfigError
from .yamlsrc import Source, read_source

# \A...\Z, not ^...$: '$' also matches before a trailing newline, so 'stage\n' would pass
NAME_PATTERN = re.compile(r"\A[A-Za-z0-9_-]+\Z")
STAGE_KEYS = ("name", "target", "type", "depends_on", "options", "resources", "description",
              "version", "priority")
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
    "functions defined in the notebook).")
STAGE_TYPES = ("simple", "parameterized")


class Stage(BaseModel):
    """One stage of a workflow.

    >>> Stage("square", "mypkg.square", type="parameterized", depends_on=["numbers"]).type
    'parameterized'
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    name: str
    target: Union[str, Callable, None] = None
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
        return {"kind": "workflow", "metadata": metadata,
                "spec": {"stages": [s.to_dict() for s in self.stages]}}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def resolve(self, namespace: dict | None = None,
                allowed_targets: list[str] | None = None) -> dict[str, Callable]:
        """Resolve every target to a callable and check its signature against the DAG.

        With ``allowed_targets`` (import-path prefixes), every target is checked against it
        before any module is imported."""
        if allowed_targets is not None:
            for stage in self.stages:
                check_target_allowed(stage, allowed_targets)
        return {s.name: resolve_target(s, namespace, allowed_targets) for s in self.stages}

    def __repr__(self) -> str:
        edges = ", ".join(f"{s.name}" + (f"<-{'+'.join(s.depends_on)}" if s.depends_on else "")
                          for s in self.stages)
        return f"Workflow({self.name!r}: {edges})"

    def _repr_html_(self) -> str:
        from .render import workflow_html
        return workflow_html(self)


def _config_error_from(exc: ValidationError, source: Source, prefix, stage: str | None = None):
    err = exc.errors()[0]
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc)
    msg = err["msg"].removeprefix("Value error, ")
    return ConfigError(f"'{key}': {msg}", key=key, stage=stage, line=source.line_of(prefix + loc))


def check_workflow(wf: Workflow, source: Source | None = None, prefix=("spec", "stages")) -> None:
    """Structural checks before any run: names, dependencies, cycles, fan-out inputs."""
    source = source or Source(None)
    if not isinstance(wf.name, str) or not NAME_PATTERN.fullmatch(wf.name):
        raise ConfigError(f"workflow name {wf.name!r} is not valid: use letters, digits, '_' and '-'",
                          key="metadata.name", line=source.line_of(("metadata", "name")))
    if not wf.stages:
        raise ConfigError(f"workflow '{wf.name}' has no stages; give at least one under spec.stages",
                          key="spec.stages", line=source.line_of(("spec",)))
    seen: dict[str, int] = {}
    for i, stage in enumerate(wf.stages):
        line = source.line_of(prefix + (i,))
        if not isinstance(stage.name, str) or not NAME_PATTERN.fullmatch(stage.name):
            raise ConfigError(f"stage name {stage.name!r} is not valid: use letters, digits, '_' and '-'",
                              key="name", line=line)
        if stage.name in seen:
            raise ConfigError(f"duplicate stage name '{stage.name}' (stage {seen[stage.name] + 1} "
                              f"has it too); stage names must be unique", stage=stage.name, line=line)
        seen[stage.name] = i
        if stage.target is None or stage.target == "":
            raise ConfigError("has no target; give an import path or a notebook function's name",
                              stage=stage.name, key="target", line=line)
        for key in stage.options:
            if key not in OPTION_KEYS:
                near = difflib.get_close_matches(key, OPTION_KEYS, n=1)
                hint = f"did you mean '{near[0]}'?" if near else "valid options: " + ", ".join(OPTION_KEYS)
                raise ConfigError(f"unknown option '{key}'", stage=stage.name, key=f"options.{key}",
                                  line=source.line_of(prefix + (i, "options", key)), hint=hint)
        apf = stage.options.get("allow_partial_failure", True)
        if not isinstance(apf, bool):
            raise ConfigError(f"options.allow_partial_failure must be true or false, got {apf!r}",
                              stage=stage.name, key="options.allow_partial_failure",
                              line=source.line_of(prefix + (i, "options", "allow_partial_failure")))
        map_on = stage.options.get("map_on")
        if map_on is not None and (not isinstance(map_on, str) or not map_on):
            raise ConfigError(f"options.map_on must name a key of the run input (a string), got {map_on!r}",
                              stage=stage.name, key="options.map_on",
                              line=source.line_of(prefix + (i, "options", "map_on")))
        timeout = stage.options.get("timeout")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not math.isfinite(timeout) or timeout <= 0):
            raise ConfigError(f"options.timeout must be a positive number of seconds, got {timeout!r}",
                              stage=stage.name, key="options.timeout",
                              line=source.line_of(prefix + (i, "options", "timeout")))
        _check_resources(stage, source.line_of(prefix + (i, "resources")))
    names = set(seen)
    for i, stage in enumerate(wf.stages):
        line = source.line_of(prefix + (i, "depends_on"))
        for dep in stage.depends_on:
            if dep == stage.name:
                raise ConfigError("depends on itself", stage=stage.name, key="depends_on", line=line)
            if dep not in names:
                near = difflib.get_close_matches(dep, list(names), n=1)
                hint = f"did you mean '{near[0]}'?" if near else "stages: " + ", ".join(seen)
                raise ConfigError(f"depends on unknown stage '{dep}'", stage=stage.name,
                                  key="depends_on", line=line, hint=hint)
        if len(set(stage.depends_on)) != len(stage.depends_on):
            raise ConfigError("lists a dependency twice in depends_on", stage=stage.name, line=line)
        if stage.type == "parameterized" and not stage.depends_on and not stage.map_on:
            raise ConfigError("is parameterized with no dependency: set options.map_on to the input "
                              "key whose list it maps over", stage=stage.name, key="options.map_on",
                              line=source.line_of(prefix + (i,)))
    cycle = _find_cycle(wf)
    if cycle:
        raise ConfigError("dependency cycle " + " -> ".join(cycle), stage=cycle[0], key="depends_on",
                          line=source.line_of(prefix + (wf.stage_names.index(cycle[0]), "depends_on")))


def _check_resources(stage: Stage, line):
    from .units import parse_bytes
    for name, amount in stage.resources.items():
        if name == "memory":
            try:
                parse_bytes(amount)
            except ValueError as exc:
                raise ConfigError(f"resources.memory: {exc}", stage=stage.name, key="resources.memory",
                                  line=line) from None
        elif isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount < 0:
            raise ConfigError(f"resources.{name} must be a non-negative number, got {amount!r}",
                              stage=stage.name, key=f"resources.{name}", line=line)


def _find_cycle(wf: Workflow) -> list[str] | None:
    deps = {s.name: s.depends_on for s in wf.stages}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(name):
        state[name] = 1
        stack.append(name)
        for dep in deps[name]:
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        state[name] = 2
        stack.pop()
        return None

    for name in deps:
        if name not in state:
            found = visit(name)
            if found:
                return found
    return None


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
    """Load a Flowdapt workflow resource from YAML text, a path, or a dict.

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
    source = read_source(src, "workflow")
    data = source.data
    if not isinstance(data, dict):
        raise ConfigError("a workflow must be a mapping with kind, metadata and spec",
                          line=source.line_of(()))
    prefix: tuple = ("spec", "stages")
    if "spec" not in data and "stages" in data:  # shorthand: {name, stages}
        data = {"kind": "workflow", "metadata": {"name": data.get("name")}, "spec": {"stages": data["stages"]}}
        source = Source(data, {("spec",) + k if k[0] == "stages" else k: v for k, v in source.lines.items()},
                        source.origin, source.line_offset)
    if ("target" in data or "__target__" in data or "services" in data) and "spec" not in data:
        key = next(k for k in ("target", "__target__", "services") if k in data)
        raise ConfigError("this is an executor config, not a workflow", key=key, line=source.line_of((key,)),
                          hint="a workflow resource has kind: workflow, metadata.name and spec.stages")
    for key in data:
        if key not in ("kind", "metadata", "spec", "version", "api_version", "apiVersion", "status"):
            near = difflib.get_close_matches(str(key), ["kind", "metadata", "spec"], n=1)
            raise ConfigError(f"unknown key '{key}' in the workflow", key=str(key),
                              line=source.line_of((key,)),
                              hint=f"did you mean '{near[0]}'?" if near else "valid: kind, metadata, spec")
    kind = data.get("kind", "workflow")
    if str(kind).lower() != "workflow":
        raise ConfigError(f"kind is {kind!r}; a workflow resource has kind: workflow", key="kind",
                          line=source.line_of(("kind",)))
    metadata = data.get("metadata") or {}
    if not isinstance(metadata, dict) or "name" not in metadata:
        raise ConfigError("the workflow needs metadata.name", key="metadata.name",
                          line=source.line_of(("metadata",)))
    spec = data.get("spec")
    for key in spec if isinstance(spec, dict) else ():
        if key != "stages":
            near = difflib.get_close_matches(str(key), ["stages"], n=1)
            raise ConfigError(f"unknown key 'spec.{key}'", key=f"spec.{key}", line=source.line_of(("spec", key)),
                              hint="did you mean 'stages'?" if near else "a workflow spec holds only 'stages'")
    if not isinstance(spec, dict) or "stages" not in spec:
        raise ConfigError("the workflow needs spec.stages, a list of stages", key="spec.stages",
                          line=source.line_of(("spec",)))
    raw_stages = spec["stages"]
    if not isinstance(raw_stages, list):
        raise ConfigError("spec.stages must be a list of stages (each starting with '- name:')",
                          key="spec.stages", line=source.line_of(("spec", "stages")))
    stages = []
    for i, raw in enumerate(raw_stages):
        line = source.line_of(prefix + (i,))
        if not isinstance(raw, dict):
            raise ConfigError(f"stage {i + 1} must be a mapping with name and target", line=line)
        name = raw.get("name")
        for key in raw:
            if key not in STAGE_KEYS:
                near = difflib.get_close_matches(str(key), STAGE_KEYS, n=1)
                hint = f"did you mean '{near[0]}'?" if near else "valid keys: " + ", ".join(STAGE_KEYS)
                raise ConfigError(f"unknown key '{key}'", stage=name, key=str(key),
                                  line=source.line_of(prefix + (i, key)), hint=hint)
        deps = raw.get("depends_on", [])
        if isinstance(deps, str):
            raise ConfigError(f"depends_on must be a list, e.g. depends_on: [{deps}]", stage=name,
                              key="depends_on", line=source.line_of(prefix + (i, "depends_on")))
        if raw.get("type", "simple") not in STAGE_TYPES:
            raise ConfigError(f"type {raw.get('type')!r} is not valid; use simple or parameterized",
                              stage=name, key="type", line=source.line_of(prefix + (i, "type")))
        target = raw.get("target", "")
        if not isinstance(target, str) and not callable(target):  # Flowdapt's API takes callables too
            raise ConfigError(f"target must be an import path, a notebook function's name or a callable, "
                              f"not {type(target).__name__}",
                              stage=name, key="target", line=source.line_of(prefix + (i, "target")))
        try:
            stages.append(Stage(**{k: v for k, v in raw.items() if v is not None or k == "target"}))
        except ValidationError as exc:
            raise _config_error_from(exc, source, prefix + (i,), stage=name) from None
    extra_meta = {k: v for k, v in metadata.items() if k != "name"}
    try:
        wf = Workflow.model_construct(name=str(metadata["name"]), stages=stages, metadata=extra_meta)
    except ValidationError as exc:  # pragma: no cover - model_construct doesn't validate
        raise _config_error_from(exc, source, ()) from None
    check_workflow(wf, source, prefix)
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


def resolve_target(stage: Stage, namespace: dict | None = None,
                   allowed_targets: list[str] | None = None) -> Callable:
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
            _refuse_unless_allowed(stage, callable_path(fn), allowed_targets,
                                   f"'{target}' in the notebook is {callable_path(fn)}, which")
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
        raise ValueError(f"allowed_targets must be a list of import-path prefixes such as "
                         f"[mypkg., __main__], got {value!r}")
    for prefix in value:
        if not isinstance(prefix, str) or not _PREFIX.fullmatch(prefix):
            raise ValueError(f"allowed_targets holds {prefix!r}: each entry is an import-path prefix "
                             f"such as mypkg. or mypkg.models or __main__")
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
        raise ConfigError(f"target {what} is not allowed: allowed_targets permits only {allowed}",
                          stage=stage.name, key="target",
                          hint="add a prefix of it to allowed_targets in the executor config if you "
                               "trust that code")


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
        hint = (f"did you mean '{near[0]}'?" if near else
                "define the function in the notebook first, or give an import path like mypkg.module.func")
        raise ConfigError(f"target '{target}' is neither a function defined in the notebook nor an "
                          f"import path", stage=stage.name, key="target", hint=hint)
    if ":" in target:
        module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"target '{target}' does not import: {exc}", stage=stage.name, key="target",
                          hint="check the module path and that its package is installed") from None
    except Exception as exc:
        raise ConfigError(f"target '{target}': importing {module_name} raised "
                          f"{type(exc).__name__}: {exc}", stage=stage.name, key="target",
                          hint=f"fix {module_name} so it imports, or name a target in another module") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n, None))]
            near = difflib.get_close_matches(part, names, n=1)
            hint = (f"did you mean '{target[:len(target) - len(attr)]}{near[0]}'?" if near and "." not in attr
                    else f"did you mean '{near[0]}'?" if near else
                    f"{module_name} defines: {', '.join(names[:12]) or 'nothing callable'}")
            raise ConfigError(f"target '{target}' does not import: {module_name} has no attribute '{attr}'",
                              stage=stage.name, key="target", hint=hint) from None
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"target '{target}' is not callable ({type(obj).__name__})", stage=stage.name,
                          key="target", hint="name a function (or another callable) defined in the module")
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
    stamp = (fn.__code__, fn.__defaults__, fn.__kwdefaults__, fn.__dict__.get("__signature__"),
             fn.__dict__.get("__wrapped__"), fn.__annotations__)
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
        what = (f"depends on {', '.join(stage.depends_on)}" if stage.depends_on else "maps over a list")
        takes = sum(1 for p in sig.parameters.values()
                    if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
        raise ConfigError(f"its function {getattr(fn, '__name__', fn)}{sig} takes {takes} positional "
                          f"argument(s) but {what}, so it is called with {count}", stage=stage.name,
                          key="target", hint=f"give it {count} parameter(s), one per dependency output"
                          ) from None
    missing = [p.name for i, p in enumerate(sig.parameters.values())
               if i >= count and p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
               and stage.depends_on]
    if missing:
        raise ConfigError(f"its function {getattr(fn, '__name__', fn)}{sig} needs argument(s) "
                          f"{', '.join(missing)} that no dependency supplies", stage=stage.name, key="target",
                          hint=f"give {', '.join(missing)} a default, or add a dependency for each")


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
    missing = [p.name for p in params if p.default is p.empty
               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in run_input]
    if missing:
        have = ", ".join(sorted(run_input)) or "none"
        raise ConfigError(f"needs input {', '.join(repr(m) for m in missing)} (input keys given: {have})",
                          stage=stage.name, key=missing[0],
                          hint="pass it in the run input, e.g. input={'%s': ...}" % missing[0])
    return {k: v for k, v in run_input.items() if k in names and k not in skip}
