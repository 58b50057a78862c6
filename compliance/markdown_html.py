"""A small Markdown → HTML renderer for the reports Bastion writes itself.

It knows only what those reports use: ``#`` headings, paragraphs, ``-`` lists, ``>``
quotes, pipe tables (``\\|`` for a literal pipe), ``**bold**`` and ``code``. Every piece
of text is HTML-escaped first, so values taken from the configuration or the log cannot
inject markup. The output is well-formed XHTML-compatible HTML5. (jinja2 is only a dev
dependency; the gateway extra does not need it for this.)
"""

from __future__ import annotations

import html
import re

_PIPE = re.compile(r"(?<!\\)\|")
_BOLD = re.compile(r"\*\*(.+?)\*\*")
_CODE = re.compile(r"`([^`]+)`")
_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}"
    "table{border-collapse:collapse}td,th{border:1px solid #999;padding:.2rem .5rem}"
    "blockquote{border-left:.3rem solid #c60;margin:0;padding:.2rem 1rem;background:#fff4e5}"
)


def inline(text: str) -> str:
    out = html.escape(text.replace("\\|", "|"), quote=True)
    out = _CODE.sub(r"<code>\1</code>", out)
    return _BOLD.sub(r"<strong>\1</strong>", out)


def table_cell(value: object) -> str:
    """A value made safe for a Markdown table cell."""
    return str(value).replace("\n", " ").replace("|", "\\|")


def _cells(line: str) -> list[str]:
    return [c.strip() for c in _PIPE.split(line.strip().strip("|"))]


def render_body(markdown: str) -> str:
    out: list[str] = []
    paragraph: list[str] = []
    lines = markdown.splitlines()

    def flush() -> None:
        if paragraph:
            out.append(f"<p>{inline(' '.join(paragraph))}</p>")
            paragraph.clear()

    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        heading = re.match(r"(#{1,6}) (.*)", stripped)
        if not stripped:
            flush()
        elif heading:
            flush()
            level = len(heading.group(1))
            out.append(f"<h{level}>{inline(heading.group(2))}</h{level}>")
        elif stripped.startswith("- "):
            flush()
            items = []
            while i < len(lines) and lines[i].strip().startswith("- "):
                items.append(f"<li>{inline(lines[i].strip()[2:])}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
            continue
        elif stripped.startswith(">"):
            flush()
            quoted = []
            while i < len(lines) and lines[i].strip().startswith(">"):
                quoted.append(lines[i].strip()[1:].strip())
                i += 1
            out.append(f"<blockquote><p>{inline(' '.join(quoted))}</p></blockquote>")
            continue
        elif stripped.startswith("|"):
            flush()
            rows = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                rows.append(_cells(lines[i]))
                i += 1
            out.append(_table(rows))
            continue
        else:
            paragraph.append(stripped)
        i += 1
    flush()
    return "\n".join(out)


def _table(rows: list[list[str]]) -> str:
    head, body = rows[0], rows[1:]
    if body and all(set(c) <= set("-: ") for c in body[0]):
        body = body[1:]
    parts = ["<table><thead><tr>"]
    parts += [f"<th>{inline(c)}</th>" for c in head]
    parts.append("</tr></thead><tbody>")
    for row in body:
        parts.append("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in row) + "</tr>")
    parts.append("</tbody></table>")
    return "".join(parts)


def render_document(markdown: str, title: str) -> str:
    """A whole HTML page for ``markdown``."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8" />'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body>\n{render_body(markdown)}\n</body></html>\n"
    )
