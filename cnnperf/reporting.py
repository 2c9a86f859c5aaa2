"""What the doctor's and the profiler's reports share: reading a record that may miss any part, the HTML
page's style, and plots drawn on Agg figures. (Numbers are formatted by :mod:`cnnperf._format`, files written
by :mod:`cnnperf._io`.)

- :func:`section`: a part of a record that may be missing (a run stopped by Ctrl-C), as a dict.
- :data:`CSS`, :func:`escape`, :func:`html_plot` (a titled figure, or a note where :class:`Skip` was raised),
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


# The style of both HTML reports (each adds its own rules after it).
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1080px;margin:2em auto;padding:0 1em;
color:#212121;line-height:1.45}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;
margin-top:1.8em}h3{font-size:1.02em;margin:.1em 0 .3em}
table{border-collapse:collapse;font-size:.9em}td,th{padding:.2em .7em;border-bottom:1px solid #eee;text-align:right}
th{background:#f5f5f5}td.l,th.l{text-align:left}tr.best td{font-weight:bold;background:#e8f5e9}
.finding{border-left:6px solid #999;background:#fafafa;padding:.5em 1em;margin:.8em 0}
.sev{display:inline-block;color:#fff;border-radius:3px;padding:0 .4em;font-size:.8em;margin-right:.4em}
.kind{color:#757575;font-size:.85em;font-family:monospace}
.verdict{font-weight:bold;padding:.5em 1em;border-radius:4px}
.error{background:#ffebee;color:#b71c1c}.warning{background:#fff3e0;color:#bf360c}.ok{background:#e8f5e9;color:#1b5e20}
.note{color:#757575;font-style:italic}figure{margin:1em 0}figure img{max-width:100%}
figcaption{color:#616161;font-size:.9em}pre{font-size:.8em;background:#f5f5f5;padding:.5em;overflow-x:auto}
dl{display:grid;grid-template-columns:max-content auto;gap:.1em 1em;font-size:.9em}dt{color:#757575}dd{margin:0}
"""


def escape(x: Any) -> str:
    """``x`` as HTML text (quotes escaped too); "" for None."""
    return html.escape(text(x, ""), quote=True)


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
