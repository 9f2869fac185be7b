"""The run input a person types: one parser for ``flowdapt-nb run --input/--input-json``, the
``%flowdapt run`` magic and the StageMapper's input box, so the same text means the same dict
everywhere.

Three forms are read:

- ``key=value`` pairs, values read as YAML: ``n=200 max_degree=6``, ``xs=[1,2] mode=fast``;
- a JSON object: ``{"n": 200}``;
- a Python dict: ``{'n': 200, 'flag': True}``.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any

from .errors import ConfigError

FORMS = (
    "write key=value pairs (n=200 max_degree=6), a JSON object ({\"n\": 200}) or a Python dict ({'n': 200})"
)
_EXAMPLES = {"--input": "n=10", "--resource": "hamster_wheels=2", "--set": "include_dashboard=false"}
_KEY_START = re.compile(r"\s*[A-Za-z_]\w*\s*=")


def parse_value(text: str) -> Any:
    """One ``key=value`` value: read as YAML (``10`` -> 10, ``[1,2]`` -> [1, 2], ``fast`` -> 'fast');
    empty is ``""``; text YAML can't read stays as typed."""
    import yaml

    if not text.strip():
        return ""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_assignments(pairs: list[str] | None, what: str = "--input", hint: str | None = None) -> dict:
    """``["n=3", "name=x", "xs=[1,2]"]`` -> {"n": 3, "name": "x", "xs": [1, 2]} (values read as YAML).

    A pair without ``=`` or with a key that is not a Python identifier is a ConfigError naming it."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip() or not key.strip().isidentifier():
            raise ConfigError(
                f"{what} takes key=value with a Python identifier as key, got {pair!r}",
                key=what,
                hint=hint or f"e.g. {what} {_EXAMPLES.get(what, 'name=value')}",
            )
        out[key.strip()] = parse_value(value)
    return out


def parse_json_object(text: str, what: str = "--input-json") -> dict:
    """A JSON object given on a command line; anything else is a ConfigError naming ``what``."""
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{what} is not valid JSON ({exc})", key=what, hint=f"e.g. {what} '{{\"n\": 10}}'"
        ) from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{what} must be a JSON object, e.g. '{{\"n\": 10}}'", key=what)
    return loaded


def input_from_args(pairs: list[str] | None, json_text: str | None = None) -> dict:
    """The run input of ``--input KEY=VALUE ...`` and ``--input-json JSON``; ``--input`` wins per key."""
    run_input = parse_json_object(json_text) if json_text else {}
    run_input.update(parse_assignments(pairs, "--input"))
    return run_input


def parse_run_input(text: str | None) -> dict:
    """The run input typed as one line (the StageMapper's box): ``n=200 max_degree=6``,
    ``{"n": 200}`` or ``{'n': 200}``; empty is ``{}``.

    Pairs are separated by spaces or commas; brackets and quotes keep a value together
    (``xs=[1, 2], name="a b"``). A bad token is a ConfigError naming it and the valid forms.

    >>> parse_run_input("n=200 max_degree=6")
    {'n': 200, 'max_degree': 6}
    >>> parse_run_input("xs=[1, 2], mode=fast")
    {'xs': [1, 2], 'mode': 'fast'}
    """
    text = (text or "").strip()
    if not text:
        return {}
    if text[0] in "{[(\"'" or (text[0].isdigit() and "=" not in text):
        return _literal_dict(text)
    return parse_assignments(_pairs(text), "run input", hint=FORMS)


def _literal_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            short = text if len(text) <= 60 else text[:57] + "..."
            raise ConfigError(
                f"run input {short!r} is neither a JSON object nor a Python dict", key="input", hint=FORMS
            ) from None
    if not isinstance(value, dict):
        raise ConfigError(
            f"the run input must be a dict, not {type(value).__name__}", key="input", hint=FORMS
        )
    return value


def _pairs(text: str) -> list[str]:
    """Split ``a=1 b=[1, 2], c="x y"`` into its pairs: spaces and commas separate, except inside
    brackets or quotes, around ``=``, and a comma not followed by a new ``key=`` (``xs=1,2`` is
    one value, as it is on a command line)."""
    pairs: list[str] = []
    current: list[str] = []
    depth = 0
    quote = ""
    i = 0
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth = max(0, depth - 1)
        elif depth == 0 and (ch.isspace() or ch == ","):
            rest = text[i + 1 :]
            if ch == "," and rest and not rest[0].isspace() and not _KEY_START.match(rest):
                current.append(ch)  # xs=1,2: part of the value
                i += 1
                continue
            joined = "".join(current)
            if ch.isspace() and (joined.endswith("=") or rest.lstrip().startswith("=")):  # n = 200
                i += 1
                continue
            if joined:
                pairs.append(joined)
            current = []
            i += 1
            continue
        current.append(ch)
        i += 1
    if current:
        pairs.append("".join(current))
    return pairs
