"""A tiny document model (headings, paragraphs, lists, tables, figures) rendered to Markdown,
self-contained HTML, and (tables) CSV and LaTeX booktabs. Inline markup is limited to
``**bold**`` and ```code```, which every target understands."""

from __future__ import annotations

import base64
import csv
import html
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union


@dataclass
class Heading:
    level: int
    text: str
    anchor: str = ""


@dataclass
class Para:
    text: str


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    name: str  # file stem and LaTeX label
    caption: str
    headers: list[str]
    rows: list[list[str]]  # display strings
    records: list[dict[str, Any]] = field(default_factory=list)  # raw values for CSV
    align: str = ""  # one of l/r per column; default: first left, rest right
    notes: str = ""

    def alignment(self) -> str:
        return self.align or "l" + "r" * (len(self.headers) - 1)


@dataclass
class Figure:
    name: str
    caption: str
    png: Path
    vector: Path | None = None
    alt: str = ""


Block = Union[Heading, Para, Bullets, Table, Figure]

_CODE = re.compile(r"`([^`]+)`")
_BOLD = re.compile(r"\*\*(.+?)\*\*")


# ------------------------------------------------------------------------------------ Markdown
def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table_markdown(t: Table) -> str:
    align = {"l": ":---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(_md_cell(h) for h in t.headers) + " |",
             "|" + "|".join(align[a] for a in t.alignment()) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows]
    out = f"*Table: {t.caption}*\n\n" + "\n".join(lines) + "\n"
    return out + (f"\n{t.notes}\n" if t.notes else "")


def to_markdown(blocks: list[Block], base: Path) -> str:
    parts = []
    for b in blocks:
        if isinstance(b, Heading):
            parts.append("#" * b.level + " " + b.text)
        elif isinstance(b, Para):
            parts.append(b.text)
        elif isinstance(b, Bullets):
            parts.append("\n".join(f"- {item}" for item in b.items))
        elif isinstance(b, Table):
            parts.append(table_markdown(b).rstrip())
        elif isinstance(b, Figure):
            rel = b.png.relative_to(base).as_posix()
            vec = f" ([vector]({b.vector.relative_to(base).as_posix()}))" if b.vector else ""
            parts.append(f"![{b.alt or b.caption}]({rel})\n\n*Figure: {b.caption}*{vec}")
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------- CSV, LaTeX
def table_csv(t: Table) -> str:
    buf = io.StringIO()
    if t.records:
        fields = list(dict.fromkeys(k for r in t.records for k in r))
        w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        w.writeheader()
        w.writerows(t.records)
    else:
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(t.headers)
        w.writerows(t.rows)
    return buf.getvalue()


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
_LATEX_UNICODE = {"±": r"$\pm$", "–": "--", "—": "---", "Δ": r"$\Delta$", "×": r"$\times$", "≤": r"$\leq$",
                  "≥": r"$\geq$", "·": r"$\cdot$", "Σ": r"$\Sigma$", "ᵢ": "", "→": r"$\rightarrow$", "…": r"\dots{}",
                  "−": "-", "≈": r"$\approx$", "†": r"\dag{}"}


def latex_escape(text: str) -> str:
    text = _CODE.sub(r"\1", _BOLD.sub(r"\1", str(text)))
    out = "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)
    for k, v in _LATEX_UNICODE.items():
        out = out.replace(k, v)
    return out


def table_latex(t: Table) -> str:
    lines = [
        "% requires \\usepackage{booktabs}",
        "\\begin{table}[htbp]",
        "\\centering",
        f"\\caption{{{latex_escape(t.caption)}}}",
        f"\\label{{tab:{re.sub(r'[^A-Za-z0-9:-]', '-', t.name)}}}",
        f"\\begin{{tabular}}{{{t.alignment()}}}",
        "\\toprule",
        " & ".join(latex_escape(h) for h in t.headers) + " \\\\",
        "\\midrule",
    ]
    lines += [" & ".join(latex_escape(c) for c in row) + " \\\\" for row in t.rows]
    lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------- HTML
def inline_html(text: str) -> str:
    out = html.escape(str(text), quote=True)
    out = _CODE.sub(lambda m: f"<code>{m.group(1)}</code>", out)
    return _BOLD.sub(lambda m: f"<strong>{m.group(1)}</strong>", out)


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;max-width:1100px;
margin:2em auto;padding:0 1em;line-height:1.5;color:#1a1a1a;background:#fff}
h1{border-bottom:2px solid #333;padding-bottom:.2em}h2{border-bottom:1px solid #ccc;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.9em;font-variant-numeric:tabular-nums}
caption{caption-side:top;text-align:left;font-style:italic;padding-bottom:.3em}
th,td{padding:.25em .7em}thead th{border-top:2px solid #333;border-bottom:1px solid #333}
tbody tr:last-child td{border-bottom:2px solid #333}td.r,th.r{text-align:right}td.r{white-space:nowrap}td.l,th.l{text-align:left}
figure{margin:1em 0 2em}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-style:italic;font-size:.9em}code{background:#f3f3f3;padding:0 .2em;border-radius:3px}
.note{font-size:.9em;color:#444}nav ul{columns:2}
"""


def _table_html(t: Table) -> str:
    al = t.alignment()
    head = "".join(f'<th class="{al[i]}" scope="col">{inline_html(h)}</th>' for i, h in enumerate(t.headers))
    body = "".join("<tr>" + "".join(f'<td class="{al[i]}">{inline_html(c)}</td>' for i, c in enumerate(row)) + "</tr>"
                   for row in t.rows)
    notes = f'<p class="note">{inline_html(t.notes)}</p>' if t.notes else ""
    return (f'<table id="tab-{html.escape(t.name)}"><caption>{inline_html(t.caption)}</caption>'
            f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{notes}")


def to_html(blocks: list[Block], title: str) -> str:
    """One self-contained page: CSS inline, figures as base64 data URIs, no scripts, no links
    to anything outside the file."""
    parts = []
    toc = [b for b in blocks if isinstance(b, Heading) and b.level == 2]
    for b in blocks:
        if isinstance(b, Heading):
            anchor = f' id="{html.escape(b.anchor)}"' if b.anchor else ""
            parts.append(f"<h{b.level}{anchor}>{inline_html(b.text)}</h{b.level}>")
            if b.level == 1 and toc:
                items = "".join(f'<li><a href="#{html.escape(h.anchor)}">{inline_html(h.text)}</a></li>'
                                for h in toc if h.anchor)
                parts.append(f"<nav><ul>{items}</ul></nav>")
        elif isinstance(b, Para):
            parts.append(f"<p>{inline_html(b.text)}</p>")
        elif isinstance(b, Bullets):
            parts.append("<ul>" + "".join(f"<li>{inline_html(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Table):
            parts.append(_table_html(b))
        elif isinstance(b, Figure):
            data = base64.b64encode(b.png.read_bytes()).decode("ascii")
            parts.append(f'<figure id="fig-{html.escape(b.name)}"><img src="data:image/png;base64,{data}" '
                         f'alt="{html.escape(b.alt or b.caption)}"><figcaption>{inline_html(b.caption)}'
                         "</figcaption></figure>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(parts) + "\n</body></html>\n")
