"""Read YAML with ``safe_load`` semantics and remember the line of every key, for errors that point at it.

Hostile input is bounded: the document is parsed once (libyaml's C parser when PyYAML has it),
an alias is never walked twice (a 500-byte "billion laughs" file stays 500 bytes of work), nesting
deeper than ``MAX_DEPTH`` levels and aliases that would expand past ``MAX_ALIAS_EXPANSION`` values
are refused with one ConfigError, and a file that is not UTF-8 is one ConfigError too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

Path_ = tuple  # a key path such as ("services", "compute", "executor", "cpus")

# Far beyond any real config or workflow; low enough that nothing downstream (pydantic, json,
# pickle) recurses into trouble. libyaml itself stops at 1000 levels, pure-Python PyYAML at ~330.
MAX_DEPTH = 100
# Values that aliases may add beyond the document's own (anchors reused a few times are fine;
# exponential reuse, the "billion laughs", is not).
MAX_ALIAS_EXPANSION = 100_000
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # same safe_load semantics, ~50x faster


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

    def sub(self, prefix) -> Source:
        """The source of the mapping found at ``prefix``, keeping line numbers."""
        prefix = tuple(prefix)
        data = self.data
        for key in prefix:
            data = data[key]
        n = len(prefix)
        lines = {p[n:]: ln for p, ln in self.lines.items() if p[:n] == prefix and len(p) > n}
        return Source(data, lines, self.origin, self.line_offset)


def _children(node) -> list:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_shape(root, error) -> None:
    """Refuse self-referencing aliases, nesting deeper than MAX_DEPTH and alias expansion past
    MAX_ALIAS_EXPANSION. One pass over the distinct nodes (an alias is the same node object)."""
    size: dict[int, int] = {}
    height: dict[int, int] = {}
    refs: dict[int, int] = {}
    nodes: dict[int, Any] = {}
    entered: set[int] = set()  # the current path from the root (depth-first, no recursion)
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        nid = id(node)
        if done:
            kids = _children(node)
            size[nid] = 1 + sum(size[id(k)] for k in kids)
            height[nid] = 1 + max((height[id(k)] for k in kids), default=0)
            entered.discard(nid)
            if height[nid] > MAX_DEPTH:
                raise error(
                    f"YAML nested more than {MAX_DEPTH} levels deep",
                    node.start_mark,
                    "flatten the structure; configs and workflows need only a few levels",
                )
            continue
        if nid in size:
            continue
        if nid in entered:
            raise error(
                "a YAML alias refers to the anchor it is inside (a recursive structure)",
                node.start_mark,
                "an alias (*name) may only repeat a value defined before it",
            )
        entered.add(nid)
        nodes[nid] = node
        stack.append((node, True))
        for kid in _children(node):
            refs[id(kid)] = refs.get(id(kid), 0) + 1
            if id(kid) not in size:
                stack.append((kid, False))
    extra = size[id(root)] - len(nodes)
    if extra > MAX_ALIAS_EXPANSION:
        worst = max((nid for nid, n in refs.items() if n > 1), key=lambda nid: size[nid] * (refs[nid] - 1))
        raise error(
            f"YAML aliases expand this document by {extra:,} values (at most "
            f"{MAX_ALIAS_EXPANSION:,}); the anchor here is repeated {refs[worst]} times",
            nodes[worst].start_mark,
            "write the values out, or repeat fewer aliases",
        )


def _collect_lines(root, out, duplicates) -> tuple[bool, Any]:
    """Line of every key path, each node walked once: a path through an alias keeps the line of
    the key that holds the alias (its contents are the anchor's, already walked), and a list item
    that is an alias has its anchor's line.

    Returns whether a collection is reached twice (an alias, or an alias inside its own anchor)
    and the first collection nested deeper than MAX_DEPTH (or None)."""
    seen: set[int] = set()
    aliased = False
    too_deep = None
    collections = (yaml.MappingNode, yaml.SequenceNode)
    stack: list[tuple[Any, tuple[str | int, ...] | None, int]] = [
        (root, (), 0)
    ]  # path None: walked for its shape only (complex keys, merged mappings)
    while stack:
        node, path, depth = stack.pop()
        if id(node) in seen:
            aliased = True
            continue
        seen.add(id(node))
        if too_deep is None and depth >= MAX_DEPTH:
            too_deep = node
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = key_node.value
                if isinstance(key_node, collections):
                    stack.append((key_node, None, depth + 1))
                kpath = None if path is None or not isinstance(key, str) or key == "<<" else path + (key,)
                if kpath is not None:  # complex or merge keys have no line of their own
                    if kpath in out:  # safe_load keeps the last silently; say so instead
                        duplicates.append((kpath, out[kpath], key_node.start_mark.line + 1))
                    out[kpath] = key_node.start_mark.line + 1
                if isinstance(value_node, collections):
                    stack.append((value_node, kpath, depth + 1))
        else:
            for i, item in enumerate(node.value):
                ipath = None if path is None else path + (i,)
                if ipath is not None:
                    out[ipath] = item.start_mark.line + 1
                if isinstance(item, collections):
                    stack.append((item, ipath, depth + 1))
    return aliased, too_deep


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def parse_yaml(text: str, origin: str | None = None, line_offset: int = 0) -> Source:
    """Parse YAML text as ``safe_load`` does; a syntax error, or input too deep or too large once
    aliases are expanded, becomes a ConfigError with its line."""
    where = f"{origin}: " if origin else ""

    def error(message, mark, hint):
        line = mark.line + 1 + line_offset if mark is not None else None
        return ConfigError(f"{where}{message}", line=line, hint=hint)

    loader = _LOADER(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:  # the pure-Python composer recurses once per level
            raise error(
                f"YAML nested more than {MAX_DEPTH} levels deep",
                None,
                "flatten the structure; configs and workflows need only a few levels",
            ) from None
        except yaml.YAMLError as exc:
            raise _syntax_error(exc, text, where, line_offset) from None
        lines: dict = {}
        duplicates: list = []
        if node is not None and isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
            # before construction: merge keys change the nodes
            aliased, too_deep = _collect_lines(node, lines, duplicates)
            if too_deep is not None:
                raise error(
                    f"YAML nested more than {MAX_DEPTH} levels deep",
                    too_deep.start_mark,
                    "flatten the structure; configs and workflows need only a few levels",
                )
            if aliased:  # only then can the document be deeper or larger than its text
                _check_shape(node, error)
        if duplicates:
            path, first, again = duplicates[0]
            raise ConfigError(
                f"{where}duplicate key '{path[-1]}' (first on line {first + line_offset})",
                key=".".join(map(str, path)),
                line=again + line_offset,
                hint="a key may appear once in a mapping: keep one of them",
            )
        try:
            data = loader.construct_document(node) if node is not None else None
        except yaml.YAMLError as exc:
            raise _syntax_error(exc, text, where, line_offset) from None
    finally:
        loader.dispose()
    return Source(data, lines, origin, line_offset)


def _syntax_error(exc: yaml.YAMLError, text: str, where: str, line_offset: int) -> ConfigError:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    line = mark.line + 1 + line_offset if mark is not None else None
    problem = _one_line(getattr(exc, "problem", None) or str(exc))
    lines = text.splitlines()
    bad_line = lines[mark.line] if mark is not None and mark.line < len(lines) else ""
    if "nesting depth" in problem:
        hint = f"flatten the structure; YAML nested more than {MAX_DEPTH} levels deep is refused"
    elif "\t" in bad_line or "'\\t'" in str(exc):
        if "'\\t'" not in problem:  # libyaml doesn't name the character
            problem += " (a tab, '\\t')"
        hint = "YAML indents with spaces, never tabs: replace the tab with spaces"
    elif isinstance(exc, yaml.reader.ReaderError):  # no mark: a character position instead
        line = text.count("\n", 0, exc.position) + 1 + line_offset
        problem = _one_line(
            f"unacceptable character #x{exc.character:04x}: {exc.reason}"
            if isinstance(exc.character, int)
            else exc.reason
        )
        hint = "remove the control character (YAML text may not hold them)"
    else:
        hint = "check the indentation and the ':' after each key"
    return ConfigError(f"{where}invalid YAML: {problem}", line=line, hint=hint)


def decode_yaml_bytes(data: bytes, origin: str) -> str:
    """File bytes as text: UTF-8 (a BOM allowed) or UTF-16/32 with a BOM, as YAML allows;
    anything else is one ConfigError naming the first bad byte and its line."""
    if data.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")):
        encoding = "utf-32"
    elif data.startswith((b"\xff\xfe", b"\xfe\xff")):
        encoding = "utf-16"
    else:
        encoding = "utf-8-sig"
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{origin}: the file is not UTF-8 text (byte 0x{data[exc.start]:02x} cannot be decoded)",
            line=line,
            hint="save it as UTF-8",
        ) from None


def read_source(src, what: str = "config") -> Source:
    """Accept YAML text, a path to a YAML file, or an already-parsed mapping."""
    if isinstance(src, Source):
        return src
    if isinstance(src, dict):
        return Source(src)
    if isinstance(src, os.PathLike) or (
        isinstance(src, str) and "\n" not in src and src.strip().lower().endswith((".yaml", ".yml"))
    ):
        path = Path(src).expanduser()
        if not path.is_file():
            raise ConfigError(f"{what} file not found: {path}")
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{what} file {path} can't be read: {exc.strerror or exc}") from None
        return parse_yaml(decode_yaml_bytes(raw, str(path)), origin=str(path))
    if isinstance(src, str):
        return parse_yaml(src)
    raise ConfigError(
        f"{what} must be YAML text, a path to a .yaml file, or a dict, not {type(src).__name__}"
    )
