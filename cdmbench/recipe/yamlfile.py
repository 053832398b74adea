"""Reading YAML strictly (recipes, ``--set`` values, run.yaml): a regular UTF-8 file of bounded size,
duplicate keys refused (naming the key and both lines), alias expansion and nesting bounded (a
"billion laughs" file is refused while composing, before anything expands it), and every problem a
``CdmbenchError`` with one line of message: no traceback.

It sits below ``validate`` (``--set`` values) and ``load`` (files), which both use it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from cdmbench.errors import RecipeError

MAX_BYTES = 1 << 20  # a recipe is a few kB; run.yaml with 1000 class names ~50 kB
MAX_NODES = 50_000  # nodes after expanding aliases (a recipe has a few hundred, run.yaml a class name each)
MAX_DEPTH = 64  # nesting, aliases expanded (a recipe nests about 6 deep)
MAX_INT_BITS = 256  # larger integers are no setting (and 0b... literals escape Python's digit limit)

_KINDS = ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "named pipe (FIFO)"), (stat.S_ISSOCK, "socket"),
          (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"))


class YAMLLimitError(yaml.MarkedYAMLError):
    """A document over the limits of this module, or with a duplicate key (``path``: its dotted key)."""

    def __init__(self, problem: str, mark, path: str = "", *, located: bool = False):
        super().__init__(problem=problem, problem_mark=mark)
        self.path = path
        self.located = located  # the problem names its lines itself


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys and documents that nest deeper than
    ``MAX_DEPTH`` or expand (aliases followed) to more than ``MAX_NODES`` nodes."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent, index):
        self._depth += 1
        self._nodes += 1
        try:
            if self._depth > MAX_DEPTH:
                raise YAMLLimitError(f"nested more than {MAX_DEPTH} levels deep", self.peek_event().start_mark)
            if self._nodes > MAX_NODES:
                raise YAMLLimitError(f"more than {MAX_NODES} values", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_document(self, node):
        _Expansion().visit(node, "", 1)  # before anything is built: nothing ever expands a bomb
        return super().construct_document(node)

    def construct_object(self, node, deep=False):
        """Values that PyYAML's constructors fail on with Python errors (``!!int xyz``, a 5000-digit
        integer, ``2001-13-45``) become YAML errors at the value's line."""
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except (ValueError, TypeError, AttributeError, OverflowError, KeyError, IndexError) as exc:
            shown = node.value if isinstance(node, ScalarNode) else node.tag
            shown = shown if len(shown) <= 40 else f"{shown[:30]}... ({len(shown)} characters)"
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read the value {shown!r} ({type(exc).__name__}: {str(exc)[:120]})",
                node.start_mark) from None

    def construct_yaml_int(self, node):
        value = super().construct_yaml_int(node)
        if abs(value).bit_length() > MAX_INT_BITS:
            raise yaml.constructor.ConstructorError(
                None, None, f"the integer {node.value[:20]}... is too large for any setting", node.start_mark)
        return value


StrictLoader.add_constructor("tag:yaml.org,2002:int", StrictLoader.construct_yaml_int)


class _Expansion:
    """Walks the composed node graph once per node (aliases share nodes): the size and depth each
    node has with its aliases expanded, duplicate keys, and aliases to an enclosing node."""

    def __init__(self):
        self.size: dict[int, tuple[int, int]] = {}  # id(node) -> (nodes, height), aliases expanded
        self.open: set[int] = set()

    def visit(self, node: Node, path: str, depth: int) -> tuple[int, int]:
        key = id(node)
        if key in self.open:
            raise YAMLLimitError("an alias refers to a collection that contains it (a recursive "
                                 "structure)", node.start_mark, path)
        if key not in self.size:
            self.open.add(key)
            self.size[key] = self._measure(node, path, depth)
            self.open.discard(key)
        nodes, height = self.size[key]
        if depth + height - 1 > MAX_DEPTH:
            raise YAMLLimitError(f"nested more than {MAX_DEPTH} levels deep once aliases are expanded",
                                 node.start_mark, path)
        return nodes, height

    def _measure(self, node: Node, path: str, depth: int) -> tuple[int, int]:
        if depth > MAX_DEPTH:
            raise YAMLLimitError(f"nested more than {MAX_DEPTH} levels deep once aliases are expanded",
                                 node.start_mark, path)
        children: list[tuple[Node, str]] = []
        if isinstance(node, SequenceNode):
            for i, item in enumerate(node.value):
                name = _item_name(item)
                children.append((item, f"{path}.{name}" if name and path else f"{path}[{i}]"))
        elif isinstance(node, MappingNode):
            seen: dict[tuple[str, str], Node] = {}
            for key_node, value_node in node.value:
                name = key_node.value if isinstance(key_node, ScalarNode) else "?"
                name = name if name.isprintable() else repr(name)  # the error stays one line
                sub = f"{path}.{name}" if path else name
                if isinstance(key_node, ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    first = seen.setdefault((key_node.tag, key_node.value), key_node)
                    if first is not key_node:
                        raise YAMLLimitError(
                            f"duplicate key '{name}' on line {key_node.start_mark.line + 1} (first on line "
                            f"{first.start_mark.line + 1}); YAML would silently keep only the last: remove "
                            "one", key_node.start_mark, sub, located=True)
                children += [(key_node, sub), (value_node, sub)]
        nodes, height = 1, 0
        for child, sub in children:
            n, h = self.visit(child, sub, depth + 1)
            nodes, height = nodes + n, max(height, h)
            if nodes > MAX_NODES:
                raise YAMLLimitError(f"expands to more than {MAX_NODES} values (aliases of aliases: a "
                                     "'billion laughs' document?); write the values out, or use fewer "
                                     "aliases", node.start_mark, path)
        return nodes, height + 1


def _item_name(node: Node) -> str | None:
    """A list item's ``name`` (stages are addressed by name), if it is a mapping with one."""
    if isinstance(node, MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, ScalarNode) and key_node.value == "name" and isinstance(value_node, ScalarNode):
                return value_node.value if value_node.value.isprintable() else repr(value_node.value)
    return None


def _where(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    return f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""


def describe_error(exc: yaml.YAMLError) -> str:
    """A YAML error in one line: the problem, its context and where."""
    if isinstance(exc, yaml.MarkedYAMLError):
        text = " ".join(part for part in (exc.context, exc.problem) if part)
        return " ".join(text.split()) + _where(exc)
    return " ".join(str(exc).split())


def parse_yaml(text: str, source: str, path: str = "", hint: str = "") -> Any:
    """YAML ``text`` (from ``source``, e.g. the file name) as Python data; a ``RecipeError`` at ``path``
    (or, for a duplicate key, at the key's own dotted path below it) when it is not valid or over
    the limits; ``hint`` (how to write it) ends the message of invalid YAML."""
    try:
        return yaml.load(text, Loader=StrictLoader)  # StrictLoader is a SafeLoader
    except YAMLLimitError as exc:
        where = ".".join(p for p in (path, exc.path) if p)
        raise RecipeError(where, f"{source}: {exc.problem}" + ("" if exc.located else _where(exc))) from None
    except yaml.YAMLError as exc:
        end = f"; {hint}" if hint else ""
        raise RecipeError(path, f"{source} is not valid YAML: {describe_error(exc)}{end}") from None
    except RecursionError:  # not reached within MAX_DEPTH; a safety net
        raise RecipeError(path, f"{source} nests too deeply") from None
    except (ValueError, TypeError, AttributeError, OverflowError) as exc:  # a safety net, as above
        raise RecipeError(path, f"{source} is not valid YAML: {type(exc).__name__}: {str(exc)[:200]}") from None


def read_text(path: str | Path, what: str = "recipe file") -> str:
    """The text of the regular UTF-8 file at ``path`` (at most ``MAX_BYTES``); anything else (missing,
    a directory, a FIFO or other special file, binary or another encoding) is a ``RecipeError``
    saying what it is. A FIFO is never opened: reading it would block."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise RecipeError("", f"{what} not found: {path}") from None
    except (OSError, ValueError) as exc:
        raise RecipeError("", f"cannot read {what} {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "special file")
        raise RecipeError("", f"{path} is a {kind}, not a {what}; give the path of a YAML file")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # swapped for a FIFO since: no block
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise RecipeError("", f"{path} is not a regular file, not a {what}; give the path of a YAML file")
            data = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise RecipeError("", f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_BYTES:
        raise RecipeError("", f"{path} is larger than {MAX_BYTES >> 20} MiB, too large for a {what}; is it the "
                              "right file?")
    if b"\0" in data:
        raise RecipeError("", f"{path} is a binary file (it holds NUL bytes), not a {what} (YAML text)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise RecipeError("", f"{path} is not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); "
                              f"a {what} is YAML in UTF-8: save it as UTF-8") from None


def read_yaml(path: str | Path, what: str = "recipe file") -> Any:
    """The YAML file at ``path`` read strictly (``read_text``, ``parse_yaml``)."""
    return parse_yaml(read_text(path, what), str(path))
