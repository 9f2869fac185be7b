"""Read YAML with ``safe_load`` and remember the line of every key, for errors that point at it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

Path_ = tuple  # a key path such as ("services", "compute", "executor", "cpus")


@dataclass
class Source:
    """Parsed data plus the YAML line (1-based) of each key path; ``lines`` is empty for dicts."""

    data: Any
    lines: dict = field(default_factory=dict)
    origin: str | None = None  # file name, when read from a file
    line_offset: int = 0  # added to every line (a notebook cell after its magic line)

    def line_of(self, path) -> int | None:
        """Line of the deepest known prefix of ``path``."""
        path = tuple(path)
        while path:
            if path in self.lines:
                return self.lines[path] + self.line_offset
            path = path[:-1]
        return None

    def sub(self, prefix) -> "Source":
        """The source of the mapping found at ``prefix``, keeping line numbers."""
        prefix = tuple(prefix)
        data = self.data
        for key in prefix:
            data = data[key]
        n = len(prefix)
        lines = {p[n:]: ln for p, ln in self.lines.items() if p[:n] == prefix and len(p) > n}
        return Source(data, lines, self.origin, self.line_offset)


def _collect_lines(node, path, out, duplicates):
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            if not isinstance(key, str) or key == "<<":  # complex or merge keys: no line of their own
                continue
            if path + (key,) in out:  # safe_load keeps the last silently; say so instead
                duplicates.append((path + (key,), out[path + (key,)], key_node.start_mark.line + 1))
            out[path + (key,)] = key_node.start_mark.line + 1
            _collect_lines(value_node, path + (key,), out, duplicates)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[path + (i,)] = item.start_mark.line + 1
            _collect_lines(item, path + (i,), out, duplicates)


def parse_yaml(text: str, origin: str | None = None, line_offset: int = 0) -> Source:
    """Parse YAML text with ``safe_load``; a syntax error becomes a ConfigError with its line."""
    try:
        data = yaml.safe_load(text)
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = mark.line + 1 + line_offset if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        bad_line = text.splitlines()[mark.line] if mark is not None and mark.line < len(text.splitlines()) else ""
        hint = ("YAML indents with spaces, never tabs: replace the tab with spaces"
                if "\t" in bad_line or "'\\t'" in str(exc) else "check the indentation and the ':' after each key")
        where = f"{origin}: " if origin else ""
        raise ConfigError(f"{where}invalid YAML: {problem}", line=line, hint=hint) from None
    lines: dict = {}
    duplicates: list = []
    if node is not None:
        _collect_lines(node, (), lines, duplicates)
    if duplicates:
        path, first, again = duplicates[0]
        where = f"{origin}: " if origin else ""
        raise ConfigError(f"{where}duplicate key '{path[-1]}' (first on line {first + line_offset})",
                          key=".".join(map(str, path)), line=again + line_offset,
                          hint="a key may appear once in a mapping: keep one of them")
    return Source(data, lines, origin, line_offset)


def read_source(src, what: str = "config") -> Source:
    """Accept YAML text, a path to a YAML file, or an already-parsed mapping."""
    if isinstance(src, Source):
        return src
    if isinstance(src, dict):
        return Source(src)
    if isinstance(src, os.PathLike) or (isinstance(src, str) and "\n" not in src
                                        and src.strip().lower().endswith((".yaml", ".yml"))):
        path = Path(src).expanduser()
        if not path.is_file():
            raise ConfigError(f"{what} file not found: {path}")
        return parse_yaml(path.read_text(), origin=str(path))
    if isinstance(src, str):
        return parse_yaml(src)
    raise ConfigError(f"{what} must be YAML text, a path to a .yaml file, or a dict, "
                      f"not {type(src).__name__}")
