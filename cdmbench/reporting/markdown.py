"""report.md from a ``Report``: prose wrapped, tables as pipe tables, protocols as a list under
the results, and no line longer than ``WIDTH`` characters: a cell that would make its row longer
moves to a note (``N1`` ...) listed under its table."""

from __future__ import annotations

import itertools
import textwrap
from collections.abc import Iterator
from typing import Any

from cdmbench.reporting.document import Block, Figure, Protocols, Report, Table, paragraphs, plain

WIDTH = 120


def _fill(text: str, first: str = "", rest: str = "") -> str:
    """``text`` wrapped to ``WIDTH``, its first line after ``first``, the others after ``rest``."""
    return textwrap.fill(text, WIDTH, initial_indent=first, subsequent_indent=rest,
                         break_on_hyphens=False) or first.rstrip()


def prose(text: str) -> str:
    """Markdown-subset text (``document.paragraphs``) with each paragraph and item wrapped."""
    out = []
    for kind, part in paragraphs(text):
        if kind == "li":
            item = _fill(part, "- ", "  ")
            out.append(out.pop() + "\n" + item if out and out[-1].startswith("- ") else item)
        elif kind == "p":
            out.append(_fill(part))
        else:  # a heading: one line, a long one wrapped as a setext heading of its level (1 or 2)
            level = int(kind[1:])
            line = "#" * level + " " + part
            out.append(line if len(line) <= WIDTH else _fill(part) + "\n" + "=-"[min(level, 2) - 1] * 3)
    return "\n\n".join(out)


def _escape(text: str) -> str:
    """Text that stays text in a table or list: pipes and angle brackets escaped."""
    return text.replace("|", "\\|").replace("<", "\\<").replace("\n", " ")


def table(t: Table, notes: Iterator[int] | None = None) -> str:
    """A pipe table (columns padded when the padded lines fit ``WIDTH``); in a row still longer,
    its longest cells become note labels (numbered by ``notes``), listed under the table."""
    notes = notes or itertools.count(1)
    rows = [[_escape(c) for c in t.columns]] + [[_escape(c) for c in row] for row in t.rows]
    moved: dict[str, str] = {}
    for row in rows[1:]:
        while sum(len(c) + 3 for c in row) + 1 > WIDTH:
            i = max(range(len(row)), key=lambda j: len(row[j]))
            if len(row[i]) <= 4:  # nothing left to shorten
                break
            row[i] = moved.setdefault(row[i], f"N{next(notes)}")
    widths = [max(3, *(len(row[j]) for row in rows)) for j in range(len(t.columns))]
    if sum(w + 3 for w in widths) + 1 > WIDTH:
        widths = [3] * len(widths)
    lines = [rows[0], ["-" * w for w in widths], *rows[1:]]
    text = "\n".join("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |"
                     for line in lines)
    return text + "".join("\n" + ("\n" if i == 0 else "") + _fill(f"**{label}**: {full}", "- ", "  ")
                          for i, (full, label) in enumerate(moved.items()))


def _fields(protocol: dict[str, Any]) -> str:
    """'key: value; ...' of every field."""
    return "; ".join(f"{k}: {plain(v)}" for k, v in protocol.items())


def _against(protocol: dict[str, Any], earlier: dict[str, dict[str, Any]]) -> str:
    """The protocol's fields, or where an earlier protocol shares most of them (the same
    evaluation's other metrics), 'as P5, but' the fields that differ and those it has not."""
    shared = {label: sum(k in other and plain(other[k]) == plain(v) for k, v in protocol.items())
              for label, other in earlier.items()}
    label = max(shared, key=shared.get, default=None)
    if label is None or shared[label] < max(3, len(protocol) / 2):
        return _fields(protocol)
    other = earlier[label]
    differ = {k: v for k, v in protocol.items() if k not in other or plain(other[k]) != plain(v)}
    lacks = [k for k in other if k not in protocol]
    return ", ".join([f"as {label}, but {_fields(differ)}" if differ else f"as {label}"]
                     + ([f"without {', '.join(lacks)}"] if lacks else []))


def protocols(block: Protocols) -> str:
    """Each protocol once: its label, the rows citing it, then its fields (``_against``)."""
    lines, earlier = [], {}
    for label, (cited, protocol) in block.items.items():
        lines.append(_fill(_escape(f"**{label}** ({cited}): {_against(protocol, earlier)}"), "- ", "  "))
        earlier[label] = protocol
    return "Protocols:\n\n" + "\n".join(lines)


def render(report: Report) -> str:
    """The whole of report.md."""
    return prose(f"# {report.title}") + "\n\n" + blocks(report.blocks)


def blocks(items: list[Block]) -> str:
    """Blocks as markdown, their notes numbered across them."""
    notes = itertools.count(1)
    parts = []
    for block in items:
        if isinstance(block, Table):
            parts.append(table(block, notes))
        elif isinstance(block, Protocols):
            parts.append(protocols(block))
        elif isinstance(block, Figure):  # the alt text left out where the line would be too long
            line = f"![{block.alt}]({block.path})"
            parts.append(line if len(line) <= WIDTH else f"![]({block.path})")
        else:
            parts.append(prose(block))
    return "\n\n".join(parts) + "\n"
