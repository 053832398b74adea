"""report.html from a ``Report``: one self-contained page (figures as base64 data URIs, inline
CSS, no script, nothing fetched: its Content-Security-Policy forbids it), readable from a phone
to a desktop (tables scroll sideways in their wrapper, images shrink to fit). Every table row
carries its identity as ``<tr class=KIND data-stage=... data-metric=...>``; protocols are cards,
the run's recipe and environment (run.yaml) fold away in ``<details>``. All text is escaped."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from typing import Any

import yaml

from cdmbench.reporting.document import Figure, Protocols, Report, Table, paragraphs, plain

CSS = """
:root { color-scheme: light; }
body { margin: 0; background: #fff; color: #1f2328; font: 16px/1.5 system-ui, -apple-system, "Segoe UI",
  Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1200px; margin: 0 auto; padding: 16px 24px 48px; }
h1 { font-size: 1.8rem; margin: .4em 0; overflow-wrap: anywhere; }
h2 { font-size: 1.35rem; margin-top: 1.8em; padding-bottom: .2em; border-bottom: 1px solid #d1d9e0; }
h3 { font-size: 1.1rem; }
code { font: .9em ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background: #eff2f5;
  padding: .1em .3em; border-radius: 4px; }
.scroll { overflow-x: auto; margin: 1em 0; border: 1px solid #d1d9e0; border-radius: 6px; }
table { border-collapse: collapse; font-size: .92rem; min-width: 100%; }
th, td { padding: 5px 10px; border-bottom: 1px solid #e6eaef; text-align: left; vertical-align: top; }
th { background: #f3f5f8; white-space: nowrap; }
td.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
td.long { min-width: 16em; }
tbody tr:nth-child(even) { background: #f9fafb; }
a { color: #0b62d6; }
figure { margin: 1em 0; }
img { max-width: 100%; height: auto; border: 1px solid #e6eaef; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: 12px; align-items: start; }
.card { border: 1px solid #d1d9e0; border-radius: 6px; padding: 10px 14px; overflow-wrap: anywhere; }
.card h3 { margin: 0 0 .2em; }
.card p { margin: 0 0 .5em; color: #59636e; font-size: .9rem; }
dl { display: grid; grid-template-columns: minmax(6em, max-content) 1fr; gap: 2px 12px; margin: 0;
  font-size: .9rem; }
dt { font-weight: 600; }
dd { margin: 0; }
details { margin: .6em 0; border: 1px solid #d1d9e0; border-radius: 6px; padding: 6px 12px; }
summary { cursor: pointer; font-weight: 600; }
pre { overflow-x: auto; font-size: .85rem; background: #f6f8fa; padding: 10px; border-radius: 6px; }
@media (max-width: 640px) {
  main { padding: 8px 12px 32px; }
  h1 { font-size: 1.4rem; }
  .cards { grid-template-columns: 1fr; }
}
"""
POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _esc(value: Any) -> str:
    """Text (or an attribute value) escaped, quotes included."""
    return html.escape(str(value), quote=True)


def inline(text: str) -> str:
    """Escaped text with `code` spans and **bold** as elements."""
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", _esc(text))
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)


def prose(text: str) -> str:
    """Markdown-subset text (``document.paragraphs``) as headings, paragraphs and lists."""
    out = []
    for kind, part in paragraphs(text):
        if kind == "li":
            item = f"<li>{inline(part)}</li>"
            out.append(out.pop()[:-5] + item + "</ul>" if out and out[-1].endswith("</ul>") else f"<ul>{item}</ul>")
        else:
            out.append(f"<{kind}>{inline(part)}</{kind}>")
    return "\n".join(out)


def _cell(column: str, value: str) -> str:
    """A ``<td>``: a protocol label links to its card; numbers align right; long text may wrap."""
    if column == "protocol" and value:
        return f'<td><a href="#protocol-{_esc(value)}">{_esc(value)}</a></td>'
    numeric = re.fullmatch(r"-?[\d.]+(e[-+]?\d+)?", value) is not None
    kind = " class=\"num\"" if numeric else " class=\"long\"" if len(value) > 40 else ""
    return f"<td{kind}>{_esc(value)}</td>"


def table(t: Table) -> str:
    """A table in a sideways-scrolling wrapper; each row ``<tr class=KIND data-KEY=VALUE>``."""
    head = "".join(f"<th scope=\"col\">{_esc(c)}</th>" for c in t.columns)
    rows = []
    for i, row in enumerate(t.rows):
        hooks = t.hooks[i] if i < len(t.hooks) else {}
        attributes = (f' class="{_esc(t.kind)}"' if t.kind else "") + "".join(
            f' data-{_esc(k)}="{_esc(v)}"' for k, v in hooks.items())
        rows.append(f"<tr{attributes}>" + "".join(_cell(c, v) for c, v in zip(t.columns, row, strict=True)) + "</tr>")
    return (f'<div class="scroll"><table><thead><tr>{head}</tr></thead>\n<tbody>\n' + "\n".join(rows)
            + "\n</tbody></table></div>")


def protocols(block: Protocols) -> str:
    """A card per protocol: its label (the rows' link target), the rows citing it, every field."""
    cards = []
    for label, (cited, protocol) in block.items.items():
        fields = "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(plain(v))}</dd>" for k, v in protocol.items())
        cards.append(f'<section class="card protocol" id="protocol-{_esc(label)}"><h3>{_esc(label)}</h3>'
                     f"<p>{_esc(cited)}</p><dl>{fields}</dl></section>")
    return '<h3>Protocols</h3>\n<div class="cards">\n' + "\n".join(cards) + "\n</div>"


def figure(block: Figure, run_path: Path) -> str:
    """The image embedded as a data URI."""
    data = base64.b64encode((run_path / block.path).read_bytes()).decode("ascii")
    return f'<figure><img src="data:image/png;base64,{data}" alt="{_esc(block.alt)}"></figure>'


def run_details(run_yaml: Path) -> str:
    """The recipe and the environment(s) of run.yaml, each folded in ``<details>``."""
    doc = yaml.safe_load(run_yaml.read_text()) if run_yaml.is_file() else None
    if not isinstance(doc, dict):
        return ""
    parts = [("Recipe (resolved)", doc.get("recipe")), ("Environment", doc.get("environment")),
             ("Earlier environments", doc.get("earlier_environments")), ("Classes", doc.get("classes"))]
    return "<h2>Recipe and environment</h2>\n" + "\n".join(
        f'<details class="run-yaml"><summary>{_esc(title)}</summary><pre>'
        f"{_esc(yaml.safe_dump(value, sort_keys=False, allow_unicode=True))}</pre></details>"
        for title, value in parts if value)


def render(report: Report, run_path: Path) -> str:
    """The whole of report.html for the run at ``run_path`` (its figures and run.yaml)."""
    body = [f"<h1>{_esc(report.title)}</h1>"]
    for block in report.blocks:
        if isinstance(block, Table):
            body.append(table(block))
        elif isinstance(block, Protocols):
            body.append(protocols(block))
        elif isinstance(block, Figure):
            body.append(figure(block, run_path))
        else:
            body.append(prose(block))
    body.append(run_details(run_path / "run.yaml"))
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f'<meta http-equiv="Content-Security-Policy" content="{POLICY}">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{_esc(report.title)}: cdmbench report</title>\n<style>{CSS}</style>\n</head>\n"
            "<body>\n<main>\n" + "\n".join(body) + "\n</main>\n</body>\n</html>\n")
