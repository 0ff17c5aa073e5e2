"""YAML loading for files written by people, read by a long-running server.

Only plain data is accepted: safe constructors, no anchors/aliases (no "billion laughs"), bounded
size, depth and node count, text only, no key written twice at any depth. Every value keeps its
line number so validation errors can point at it. The server's config file is read with the same
`UniqueKeyLoader`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

MAX_BYTES = 256 * 1024
MAX_NODES = 5000
MAX_DEPTH = 12
_PLAIN_TAGS = {"!", *(f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "seq", "map"))}


class YamlRejected(ValueError):
    def __init__(self, message: str, line: int | None = None):
        super().__init__(message)
        self.line = line


@dataclass
class Located:
    """A mapping value with where it was written (1-based line); for a list, each item's line,
    for a mapping, each key's line (so an error can point at the item it is about)."""

    value: Any
    line: int
    item_lines: tuple[int, ...] = ()
    key_lines: dict[str, int] | None = None


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys without a word: a section or field written twice
    (a second `transcript:` further down) would silently drop the first one's settings."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                try:
                    key = self.construct_object(key_node, deep=True)
                    first = seen.setdefault(key, key_node.start_mark.line + 1)
                except TypeError:  # an unhashable key: construct_mapping says so itself
                    continue
                if first != key_node.start_mark.line + 1:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"{key!r} appears twice (first on line {first})", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _check_events(text: str) -> None:
    count = 0
    depth = 0
    for ev in yaml.parse(text, Loader=yaml.SafeLoader):
        count += 1
        if count > MAX_NODES:
            raise YamlRejected(f"too many YAML nodes (limit {MAX_NODES})")
        if isinstance(ev, yaml.AliasEvent) or getattr(ev, "anchor", None):
            raise YamlRejected("YAML anchors and aliases (&name, *name) are not allowed in persona files",
                               ev.start_mark.line + 1)
        tag = getattr(ev, "tag", None)
        if tag and tag not in _PLAIN_TAGS:
            raise YamlRejected(f"YAML tags like {tag!r} are not allowed in persona files (plain values only)",
                               ev.start_mark.line + 1)
        if isinstance(ev, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise YamlRejected(f"nesting deeper than {MAX_DEPTH} levels", ev.start_mark.line + 1)
        elif isinstance(ev, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def _to_python(node: yaml.Node) -> Any:
    constructor = UniqueKeyLoader("")
    return constructor.construct_object(node, deep=True)


def load_located(data: bytes) -> tuple[dict[str, Located], int]:
    """Parse a persona file into {key: Located(value, line)}; returns (mapping, line of the document)."""
    if len(data) > MAX_BYTES:
        raise YamlRejected(f"file is {len(data)} bytes; persona files are limited to {MAX_BYTES} bytes")
    if b"\x00" in data:
        raise YamlRejected("file contains NUL bytes: not a text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise YamlRejected(f"file is not UTF-8 text (byte {exc.start})") from None
    try:
        _check_events(text)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        raise YamlRejected(f"YAML syntax error: {exc.problem or exc}", line) from None
    except yaml.YAMLError as exc:
        raise YamlRejected(f"YAML error: {exc}") from None
    if root is None:
        raise YamlRejected("file is empty", 1)
    if not isinstance(root, yaml.MappingNode):
        raise YamlRejected("a persona file must be a mapping of fields (key: value)", root.start_mark.line + 1)
    out: dict[str, Located] = {}
    for key_node, value_node in root.value:
        line = key_node.start_mark.line + 1
        if not isinstance(key_node, yaml.ScalarNode):
            raise YamlRejected("field names must be plain words", line)
        key = str(key_node.value)
        if key in out:
            raise YamlRejected(f"field '{key}' appears twice (first on line {out[key].line})", line)
        try:
            value = _to_python(value_node)
        except yaml.YAMLError as exc:
            raise YamlRejected(f"field '{key}': {exc}", line) from None
        items = tuple(n.start_mark.line + 1 for n in value_node.value) \
            if isinstance(value_node, yaml.SequenceNode) else ()
        keys = {str(k.value): k.start_mark.line + 1 for k, _ in value_node.value if isinstance(k, yaml.ScalarNode)} \
            if isinstance(value_node, yaml.MappingNode) else None
        out[key] = Located(value, value_node.start_mark.line + 1 if value_node is not None else line, items, keys)
    return out, root.start_mark.line + 1
