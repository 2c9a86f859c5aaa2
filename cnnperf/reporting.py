"""What the doctor's and the profiler's reports share: reading a record that may miss any part, the HTML
page's style, and plots drawn on Agg figures. (Numbers are formatted by :mod:`cnnperf._format`, files written
by :mod:`cnnperf._io`.)

- :func:`section`: a part of a record that may be missing (a run stopped by Ctrl-C), as a dict.
- :data:`CSS`, :func:`escape`, :func:`html_table`, :func:`html_plot` (a titled figure, or a note where
  :class:`Skip` was raised),
  :func:`figure`, :func:`png_base64`: the pieces of a self-contained HTML report. Figures are
  :class:`matplotlib.figure.Figure` objects printed by the Agg canvas, never pyplot, so the user's interactive
  backend and pyplot's figure registry are left alone.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any, Mapping

from cnnperf._format import text


def section(record: Mapping, *keys: str) -> Mapping:
    """``record[k1][k2]...`` as a dict, ``{}`` where anything on the way is missing or null."""
    for key in keys:
        record = record.get(key) if isinstance(record, Mapping) else None
    return record if isinstance(record, Mapping) else {}


class Skip(Exception):
    """A plot that cannot be drawn from this record; the message is the note shown in its place."""


def figure(width: float, height: float):
    """A new matplotlib Figure (constrained layout) of ``width`` x ``height`` inches, outside pyplot."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def png_base64(fig) -> str:
    """``fig`` rendered by the Agg canvas as a PNG (90 dpi, no timestamp metadata), base64 text."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, metadata={"Software": None})
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# The style of both HTML reports (each adds its own rules after it). Cells do not wrap (a number split over lines
# reads as two); headers and a cell of class "wrap" (notes, sentences) do. A table sits in a div.scroll, which scrolls
# sideways rather than widen the page should a table ever be wider than the window. Cells of class "opt" go
# in a window narrower than NARROW_PX, and the p.narrow note under the table says so.
NARROW_PX = 1000
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;
color:#212121;line-height:1.45}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;
margin-top:1.8em}h3{font-size:1.02em;margin:.1em 0 .3em}
div.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;font-size:.88em}td,th{padding:.2em .45em;border-bottom:1px solid #eee;text-align:right;
white-space:nowrap;vertical-align:top}td.wrap{white-space:normal}
tr.noted td{border-bottom:none}tr.noterow td{color:#616161;font-size:.92em;padding:0 .6em .3em 2em}
tr.noterow div{width:0;min-width:max(100%,min(40em,80vw))}
th{background:#f5f5f5;white-space:normal;vertical-align:bottom}td.l,th.l{text-align:left}
tr.best td{font-weight:bold;background:#e8f5e9}
p.narrow{display:none;color:#757575;font-size:.85em;margin:.3em 0}
@media (max-width:NARROW_PXpx){.opt{display:none}p.narrow{display:block}}
.finding{border-left:6px solid #999;background:#fafafa;padding:.5em 1em;margin:.8em 0}
.sev{display:inline-block;color:#fff;border-radius:3px;padding:0 .4em;font-size:.8em;margin-right:.4em}
.kind{color:#757575;font-size:.85em;font-family:monospace}
.verdict{font-weight:bold;padding:.5em 1em;border-radius:4px}
.verdict.error{background:#ffebee;color:#b71c1c}.verdict.warning{background:#fff3e0;color:#bf360c}
.verdict.ok{background:#e8f5e9;color:#1b5e20}
.note{color:#757575;font-style:italic}figure{margin:1em 0}figure img{max-width:100%}
figcaption{color:#616161;font-size:.9em}pre{font-size:.8em;background:#f5f5f5;padding:.5em;overflow-x:auto;
white-space:pre-wrap;word-break:break-word}
dl{display:grid;grid-template-columns:max-content auto;gap:.1em 1em;font-size:.9em}dt{color:#757575}dd{margin:0}
""".replace("NARROW_PX", str(NARROW_PX))


def escape(x: Any) -> str:
    """``x`` as HTML text (quotes escaped too); "" for None."""
    return html.escape(text(x, ""), quote=True)


def html_table(heads: list[tuple[str, str]], rows: list[tuple], narrow_note: str = "") -> list[str]:
    """A table in its div.scroll. ``heads`` are (text, class) per column; ``rows`` are (cells, row class) or
    (cells, row class, note), with (text, class) or (text, class, tooltip) per cell. Texts are escaped here; a
    class "opt" on a head goes on its column's cells too (hidden in a narrow window); a cell class "wrap" lets
    it wrap; a row's note (an error, a reason) is a line of its own under the row, as wide as the other rows
    make the table, so that sentences never widen it. ``narrow_note`` shows under the table in a narrow window only."""
    optional = [i for i, (_, cls) in enumerate(heads) if "opt" in cls.split()]

    def attr(cls: str, i: int) -> str:
        classes = cls.split() + (["opt"] if i in optional and "opt" not in cls.split() else [])
        return f' class="{" ".join(classes)}"' if classes else ""

    out = ['<div class="scroll"><table>',
           "<tr>" + "".join(f"<th{attr(cls, i)}>{escape(name)}</th>" for i, (name, cls) in enumerate(heads)) + "</tr>"]
    for cells, row_class, *note in rows:
        if len(cells) != len(heads):
            raise ValueError(f"a row of {len(cells)} cells for {len(heads)} heads")
        tds = []
        for i, (content, cls, *tooltip) in enumerate(cells):
            title = f' title="{escape(tooltip[0])}"' if tooltip and tooltip[0] else ""
            tds.append(f"<td{attr(cls, i)}{title}>{escape(content)}</td>")
        noted = bool(note and note[0])
        out.append(f"<tr{attr(row_class + (' noted' if noted else ''), -1)}>{''.join(tds)}</tr>")
        if noted:
            out.append(f'<tr class="noterow"><td class="l wrap" colspan="{len(heads)}"><div>{escape(note[0])}</div>'
                       "</td></tr>")
    out.append("</table></div>")
    if optional and narrow_note:
        out.append(f'<p class="narrow">{escape(narrow_note)}</p>')
    return out


def html_plot(record: Mapping, title: str, caption: str, plot) -> list[str]:
    """An <h2> ``title`` and the figure ``plot(record)`` as an inline PNG with ``caption``; where ``plot``
    raises :class:`Skip`, its message as a note instead."""
    out = [f"<h2>{escape(title)}</h2>"]
    try:
        fig = plot(record)
    except Skip as skip:
        return out + [f'<p class="note">Not shown: {escape(skip)}.</p>']
    out.append(f'<figure><img alt="{escape(title)}" src="data:image/png;base64,{png_base64(fig)}">'
               f"<figcaption>{escape(caption)}</figcaption></figure>")
    return out
