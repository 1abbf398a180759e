"""The report's HTML: one self-contained page (inline CSS; images are files beside it, referenced
relatively, so the report/ folder can be copied or served as is). Every value is escaped here."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

CSS = """
:root { --ink: #1f2328; --muted: #57606a; --line: #d0d7de; --soft: #f6f8fa; --note: #fff8c5; --note-line: #d4a72c; }
* { box-sizing: border-box; }
body { font: 15px/1.5 -apple-system, "Segoe UI", "DejaVu Sans", Helvetica, Arial, sans-serif; color: var(--ink);
       margin: 0; background: #fff; }
main { max-width: 1040px; margin: 0 auto; padding: 24px 28px 64px; }
header { border-bottom: 2px solid var(--ink); margin-bottom: 8px; padding-bottom: 8px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 20px; margin: 36px 0 8px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 16px; margin: 20px 0 6px; }
.sub { color: var(--muted); margin: 0; }
nav { font-size: 14px; margin: 10px 0 0; }
nav a { margin-right: 14px; color: #0969da; text-decoration: none; }
p.lead { margin: 4px 0 10px; color: var(--muted); }
figure { margin: 10px 0 18px; }
figure img { width: 100%; max-width: 990px; border: 1px solid var(--line); border-radius: 4px; }
figcaption { color: var(--muted); font-size: 14px; margin-top: 6px; }
table { border-collapse: collapse; margin: 8px 0 14px; font-size: 14px; }
th, td { border: 1px solid var(--line); padding: 5px 9px; text-align: left; vertical-align: top; }
th { background: var(--soft); font-weight: 600; }
tbody tr:nth-child(even) td { background: #fbfcfd; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.num { white-space: nowrap; }
table.kv th { width: 230px; }
small.ci { color: var(--muted); display: block; font-size: 12px; }
.note { background: var(--note); border-left: 4px solid var(--note-line); padding: 8px 12px; margin: 8px 0 12px;
        font-size: 14px; }
div.scroll { overflow-x: auto; max-width: 100%; }
details { margin: 8px 0; }
summary { cursor: pointer; font-weight: 600; }
code { background: var(--soft); padding: 1px 4px; border-radius: 3px; font-size: 13px; }
.muted { color: var(--muted); }
"""


@dataclass
class Section:
    """One titled part of the page: optional figure, tables (already rendered) and notes about missing data."""

    id: str
    title: str
    lead: str = ""
    figure: tuple[str, str, str] | None = None  # (src, alt, caption)
    blocks: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# --- value formatting ----------------------------------------------------------------------------

def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def fmt_num(value: Any, digits: int = 3) -> str:
    """A number with `digits` significant figures; "—" for missing."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "—" if value is None else esc(value)
    if float(value).is_integer() and abs(value) < 1e15:
        return f"{int(value):,}"
    if abs(value) >= 10 ** digits:
        return f"{value:,.0f}"
    return f"{value:,.{digits}g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def fmt_pct(value: Any, ci: Any = None) -> str:
    """"62.5%" with its confidence interval beneath ("48.1–75.3%"); "—" for missing."""
    if not isinstance(value, (int, float)):
        return "—"
    out = f"{value * 100:.1f}%"
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(c, (int, float)) for c in ci):
        out += f'<small class="ci">{ci[0] * 100:.1f}–{ci[1] * 100:.1f}%</small>'
    return out


def fmt_duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "—"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{seconds:.1f} s"


def fmt_mib(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "—"
    return f"{value / 1024:.2f} GiB" if value >= 1024 else f"{value:.0f} MiB"


# --- building blocks -----------------------------------------------------------------------------

def table(headers: list[str], rows: list[list[str]], numeric: set[int] | None = None, css: str = "") -> str:
    """Cells are HTML already (format with fmt_* or esc); `numeric` column indexes are right-aligned."""
    numeric = numeric or set()
    head = "".join(f'<th{" class=num" if i in numeric else ""}>{esc(h)}</th>' for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(f'<td{" class=num" if i in numeric else ""}>{c}</td>' for i, c in enumerate(row))
                   + "</tr>" for row in rows)
    # The wrapper scrolls a wide table sideways instead of widening the whole page.
    return f'<div class="scroll"><table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def kv_table(pairs: list[tuple[str, str]]) -> str:
    """Two columns, label → value (value is HTML already)."""
    body = "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in pairs)
    return f'<table class="kv"><tbody>{body}</tbody></table>'


def details(summary: str, body: str, open_: bool = False) -> str:
    return f'<details{" open" if open_ else ""}><summary>{esc(summary)}</summary>{body}</details>'


def render_section(section: Section) -> str:
    parts = [f'<section id="{esc(section.id)}"><h2>{esc(section.title)}</h2>']
    if section.lead:
        parts.append(f'<p class="lead">{section.lead}</p>')
    parts.extend(f'<div class="note">{note}</div>' for note in section.notes)
    if section.figure:
        src, alt, caption = section.figure
        parts.append(f'<figure><img src="{esc(src)}" alt="{esc(alt)}"><figcaption>{caption}</figcaption></figure>')
    parts.extend(section.blocks)
    parts.append("</section>")
    return "\n".join(parts)


def render_page(title: str, subtitle: str, sections: list[Section]) -> str:
    nav = "".join(f'<a href="#{esc(s.id)}">{esc(s.title)}</a>' for s in sections)
    body = "\n".join(render_section(s) for s in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>"
            f'<header><h1>{esc(title)}</h1><p class="sub">{subtitle}</p><nav>{nav}</nav></header>\n'
            f"{body}\n</main></body></html>\n")
