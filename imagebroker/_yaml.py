"""YAML with line numbers, so a bad policy or catalog says `file:line: field: problem`.

Every policy and catalog file is read here, and input no sane file has fails fast: as a `ConfigError`
naming the file (and the line where known), which the CLI turns into exit 2, never as a traceback,
a long wait or gigabytes of memory.

- Size: at most `MAX_BYTES` (256 KiB: room for hundreds of private offerings; the largest built-in
  catalog file is under 8 KiB), checked before parsing: the worst case, a file of nothing but tiny
  flow-style scalars, takes 1-2 s on a slow machine (8 s at 1 MiB).
- Encoding: UTF-8 (a BOM is allowed); the error names the line of the first bad byte.
- Nesting: at most `MAX_DEPTH` (64) mappings/sequences deep, counting what aliases bring in: the
  code after the parser (`_walk`, `deep_merge`, pydantic) recurses, and 1000 levels crashed it.
- Aliases: anchors are kept for what they are for (a catalog shares a `capabilities` block), but
  each alias adds the number of nodes it stands for once expanded (a scalar 1, a collection all of
  its nodes, its own aliases expanded too), and a document may gain at most `MAX_ALIAS_NODES`
  (10,000) nodes that way. A "billion laughs" (nine aliases of nine aliases of ... of a string:
  9**9 nodes from 500 bytes) is refused at the alias that crosses the budget, while composing,
  before anything is expanded; the sizes are memoised per node, so the check is linear in the file.
  An alias inside its own anchor (a recursive structure) is refused outright.
- Numbers: a plain number (or a quoted string that is exactly a number, as prices are written) has
  at most `MAX_NUMBER_CHARS` (100) characters and a decimal exponent within +-`MAX_EXPONENT` (100),
  so `1e999`, `1.0e+999` (which YAML makes `inf`) or an int of thousands of digits never reach
  int(), float or Decimal arithmetic; a plain `.inf`, `.nan`, `inf` or `nan` is refused (quote it
  when it is text). A scalar the YAML library cannot build (`2026-02-30`) names its line.

The parser is libyaml's when PyYAML has it (four times faster than the pure-Python one), with
PyYAML's composer above it, where the checks are made.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.resolver import Resolver

from .errors import ConfigError

try:
    from yaml._yaml import CParser as _Parser
except ImportError:  # PyYAML built without libyaml
    _Parser = None

Path_ = tuple[str | int, ...]

MAX_BYTES = 256 << 10
MAX_DEPTH = 64
MAX_ALIAS_NODES = 10_000
MAX_NUMBER_CHARS = 100
MAX_EXPONENT = 100

# How PyYAML's constructors fail on text they cannot build: `2026-02-30` (ValueError), `!!int ''`
# (IndexError), `!!timestamp x` (AttributeError). They are pure functions of the text, so each of
# these is a problem with the file, never a bug here.
SCALAR_FAILURES = (ValueError, OverflowError, IndexError, AttributeError, TypeError, KeyError)
_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_NUMBER = re.compile(r"[-+]?(?=\.?[0-9])[0-9_]*(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)?")
_NON_FINITE = re.compile(r"[-+]?\.?(?:inf|infinity|nan)", re.IGNORECASE)


class Located:
    """Parsed YAML data plus the line (1-based) of every key and list item."""

    def __init__(self, data: Any, lines: dict[Path_, int], file: str) -> None:
        self.data, self.lines, self.file = data, lines, file

    def line(self, path: Path_) -> int | None:
        while True:
            if path in self.lines:
                return self.lines[path]
            if not path:
                return None
            path = path[:-1]

    def error(self, exc: ValidationError, base: Path_ = ()) -> ConfigError:
        return self.error_from(exc.errors(), base)

    def error_from(self, errors: Sequence[ErrorDetails], base: Path_ = ()) -> ConfigError:
        """Pydantic's `errors` (about data found at `base` in this file), every one of them, as
        `file:line: field: problem` lines."""
        problems = []
        for err in errors:
            msg = str(err["msg"]).removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key (not allowed here)"
            problems.append((self.path(err, base), msg))
        return self.problems_error(problems)

    def problems_error(self, problems: Sequence[tuple[Path_, str]]) -> ConfigError:
        """One ConfigError for every (field path, problem): the first names its file, line and field,
        and each further one follows on a line of its own, in the same form."""
        def field(path: Path_) -> str:
            return ".".join(str(p) for p in path) or "(top level)"

        (path, msg), rest = problems[0], problems[1:]
        for p, m in rest:
            where = ":".join(str(x) for x in (self.file, self.line(p)) if x is not None)
            msg += f"\n{where}: {field(p)}: {m}"
        return ConfigError(msg, file=self.file, line=self.line(path), field=field(path))

    def path(self, err: ErrorDetails, base: Path_ = ()) -> Path_:
        """Where in the file a pydantic error points: its `loc` under `base`, without the names
        pydantic adds for validators and tagged unions (`price.per_image.usd` is `price.usd` here:
        a key the file's mapping lacks, skipped when the rest of the path goes on in the file)."""
        loc = base + tuple(p for p in err["loc"]
                           if not (isinstance(p, str) and p.startswith("function-")))
        out: list[str | int] = []
        node: Any = self.data
        for i, p in enumerate(loc):
            if (isinstance(node, dict) and p not in node and i + 1 < len(loc)
                    and loc[i + 1] in node):
                continue
            out.append(p)
            node = _child(node, p)
        return tuple(out)

    def has(self, path: Path_) -> bool:
        """Whether the file itself gives a value at `path`."""
        node: Any = self.data
        for p in path:
            node = _child(node, p, _MISSING)
            if node is _MISSING:
                return False
        return True


_MISSING = object()


def _child(node: Any, key: str | int, default: Any = None) -> Any:
    if isinstance(node, dict):
        return node.get(key, default)
    if isinstance(node, list) and isinstance(key, int) and 0 <= key < len(node):
        return node[key]
    return default


class _Checks(Composer):
    """PyYAML's composer, with the depth, alias and number checks of the module docstring."""

    def _init_checks(self, file: str) -> None:
        self.file = file
        self.depth = 0
        self.alias_nodes = 0
        self.open_anchors: set[str] = set()
        self.sizes: dict[int, tuple[int, int]] = {}   # id(node) -> (nodes, height) when expanded

    def _fail(self, message: str, mark: Any) -> ConfigError:
        return ConfigError(message, file=self.file, line=mark.line + 1 if mark else None)

    def _size(self, node: yaml.Node) -> tuple[int, int]:
        known = self.sizes.get(id(node))
        if known is not None:
            return known
        nodes, height = 1, 0
        if isinstance(node, (yaml.SequenceNode, yaml.MappingNode)):
            children = node.value if isinstance(node, yaml.SequenceNode) else [
                n for pair in node.value for n in pair]
            for child in children:
                n, h = self._size(child)
                nodes, height = nodes + n, max(height, h)
            height += 1
        self.sizes[id(node)] = nodes, height
        return nodes, height

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self.open_anchors:
                raise self._fail(f"alias *{event.anchor} is inside its own anchor (a recursive "
                                 "structure)", event.start_mark)
            node = super().compose_node(parent, index)
            nodes, height = self._size(node)
            self.alias_nodes += nodes
            if self.alias_nodes > MAX_ALIAS_NODES:
                raise self._fail(f"aliases expand to more than {MAX_ALIAS_NODES} nodes (an alias "
                                 "bomb?); write the data out instead", event.start_mark)
            if self.depth + height > MAX_DEPTH:
                raise self._fail(f"nested more than {MAX_DEPTH} levels deep (through alias "
                                 f"*{event.anchor})", event.start_mark)
            return node
        if not isinstance(event, yaml.CollectionStartEvent):
            return super().compose_node(parent, index)
        if self.depth >= MAX_DEPTH:
            raise self._fail(f"nested more than {MAX_DEPTH} levels deep", event.start_mark)
        self.depth += 1
        if event.anchor is not None:
            self.open_anchors.add(event.anchor)
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1
            self.open_anchors.discard(event.anchor)

    def compose_mapping_node(self, anchor: str | None) -> yaml.MappingNode:
        """A key given twice is refused (PyYAML keeps the last silently: a typo's second `objective:`)."""
        node = super().compose_mapping_node(anchor)
        seen: dict[str, int] = {}
        for key, _ in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                continue
            if key.value in seen:
                raise self._fail(f"key {key.value!r} is given twice (first on line {seen[key.value]})",
                                 key.start_mark)
            seen[key.value] = key.start_mark.line + 1
        return node

    def compose_scalar_node(self, anchor: str | None) -> yaml.ScalarNode:
        node = super().compose_scalar_node(anchor)
        value, number = node.value, node.tag in (_INT, _FLOAT)   # resolved, or tagged !!float
        if (number or not node.style) and _NON_FINITE.fullmatch(value):
            raise self._fail(f"{value} is not a finite number (quote it if it is text)",
                             node.start_mark)
        if number or _NUMBER.fullmatch(value):
            problem = _number_problem(value)
            if problem:
                raise self._fail(problem, node.start_mark)
        return node

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)  # type: ignore[misc]
        except SCALAR_FAILURES as exc:
            what = repr(node.value) if isinstance(node, yaml.ScalarNode) else node.id
            raise self._fail(f"cannot read {what} as {node.tag.rsplit(':', 1)[-1]}: {exc}",
                             node.start_mark) from None


def _number_problem(value: str) -> str | None:
    shown = value if len(value) <= 24 else value[:20] + "..."
    if len(value) > MAX_NUMBER_CHARS:
        return f"number {shown} has more than {MAX_NUMBER_CHARS} characters"
    try:
        number = Decimal(value.replace("_", ""))
    except InvalidOperation:   # 0x.., 0o.., 1:30 (YAML 1.1 sexagesimal): short, so harmless
        return None
    if abs(number.adjusted()) > MAX_EXPONENT:
        return f"number {shown} is out of range (exponent beyond +-{MAX_EXPONENT})"
    return None


if _Parser is not None:
    class _Loader(_Checks, _Parser, SafeConstructor, Resolver):
        def __init__(self, text: str, file: str) -> None:
            _Parser.__init__(self, text)
            _Checks.__init__(self)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)
            self._init_checks(file)
else:  # pragma: no cover - PyYAML without libyaml
    from yaml.parser import Parser
    from yaml.reader import Reader
    from yaml.scanner import Scanner

    class _Loader(Reader, Scanner, Parser, _Checks, SafeConstructor, Resolver):  # type: ignore[no-redef]
        def __init__(self, text: str, file: str) -> None:
            Reader.__init__(self, text)
            Scanner.__init__(self)
            Parser.__init__(self)
            _Checks.__init__(self)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)
            self._init_checks(file)


def _walk(node: yaml.Node, path: Path_, lines: dict[Path_, int]) -> None:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            sub = path + (str(key.value),)
            _walk(value, sub, lines)
            lines[sub] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, path + (i,), lines)


def load_text(text: str, file: str) -> Located:
    if len(text) > MAX_BYTES:
        raise ConfigError(f"larger than {MAX_BYTES // 1024} KiB; not a policy or catalog file",
                          file=file)
    try:
        text.encode()
    except UnicodeEncodeError as exc:   # only from a caller's str: files are decoded strictly
        raise ConfigError("not valid text (a lone surrogate)", file=file,
                          line=text.count("\n", 0, exc.start) + 1) from None
    try:
        loader = _Loader(text, file)   # the pure-Python reader checks the characters here
        try:
            node = loader.get_single_node()
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {_problem(exc)}", file=file,
                          line=_line(exc, text)) from None
    lines: dict[Path_, int] = {}
    if node is not None:
        _walk(node, (), lines)   # after construction: merge keys (<<) are resolved by then
    return Located(data if data is not None else {}, lines, file)


def _problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.reader.ReaderError):
        char = exc.character
        code = char if isinstance(char, int) else ord(char) if char else None
        return exc.reason if code is None else f"{exc.reason} (#x{code:04x})"
    return getattr(exc, "problem", None) or str(exc)


def _line(exc: yaml.YAMLError, text: str) -> int | None:
    mark = getattr(exc, "problem_mark", None)
    if mark is not None:
        return mark.line + 1
    position = getattr(exc, "position", None)   # a ReaderError: a character YAML does not allow
    if isinstance(position, int):   # libyaml counts bytes of UTF-8, PyYAML characters
        source: str | bytes = text.encode() if _Parser is not None else text
        return source.count("\n" if isinstance(source, str) else b"\n", 0, position) + 1
    return None


def load_file(path: Path) -> Located:
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", file=str(path)) from None
    if len(raw) > MAX_BYTES:
        raise ConfigError(f"larger than {MAX_BYTES // 1024} KiB; not a policy or catalog file",
                          file=str(path))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text (byte 0x{raw[exc.start]:02x}); save the file as UTF-8",
                          file=str(path), line=raw.count(b"\n", 0, exc.start) + 1) from None
    return load_text(text, str(path))
