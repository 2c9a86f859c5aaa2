"""What the doctor's and the profiler's reports share: strict JSON, lenient readers of a record, number
formatting, the HTML page's style, and plots drawn on Agg figures.

- :func:`jsonable` / :func:`write_json_atomic`: a record as strict JSON (NaN and inf become null), atomically.
- :func:`section`, :func:`num`, :func:`int_or_none`, :func:`text`: read a record that may miss any part
  (a run stopped by Ctrl-C) without failing; :func:`fmt`, :func:`pct`, :func:`duration`, :func:`plural`
  format what was found.
- :data:`CSS`, :func:`escape`, :func:`html_plot` (a titled figure, or a note where :class:`Skip` was raised),
  :func:`figure`, :func:`png_base64`: the pieces of a self-contained HTML report. Figures are
  :class:`matplotlib.figure.Figure` objects printed by the Agg canvas, never pyplot, so the user's interactive
  backend and pyplot's figure registry are left alone.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import math
import os
from pathlib import Path
from typing import Any, Mapping

from cnnperf import bench


def jsonable(obj: Any) -> Any:
    """``obj`` with every NaN/inf float replaced by None, tuples by lists, numpy/torch scalars and arrays by
    Python numbers and lists, paths by strings; anything else json cannot write is left for json to reject."""
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if isinstance(obj, float):  # numpy.float64 too: it subclasses float
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k if isinstance(k, (str, int, float, bool)) or k is None else str(k): jsonable(v)
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist"):  # numpy scalar or array, torch tensor (0-d gives a Python number)
        return jsonable(obj.tolist())
    return obj


def write_json_atomic(path: str | os.PathLike, record: Mapping) -> None:
    """Write ``jsonable(record)`` to ``path`` as strict JSON (``allow_nan=False``, indent 1), atomically.

    The writing itself is :func:`cnnperf.bench.write_json_atomic`: a temporary file in the same directory,
    fsync, ``os.replace``; the temporary file is removed on any error.
    """
    bench.write_json_atomic(Path(path), jsonable(record))


def section(record: Mapping, *keys: str) -> Mapping:
    """``record[k1][k2]...`` as a dict, ``{}`` where anything on the way is missing or null."""
    for key in keys:
        record = record.get(key) if isinstance(record, Mapping) else None
    return record if isinstance(record, Mapping) else {}


def num(x: Any) -> float:
    """A number as a float (NaN stays NaN); None or anything not a number is NaN."""
    if isinstance(x, bool) or x is None:
        return math.nan
    if isinstance(x, (int, float)):
        return float(x)
    if hasattr(x, "item"):
        with contextlib.suppress(TypeError, ValueError):
            return float(x.item())
    return math.nan


def int_or_none(x: Any) -> int | None:
    """:func:`num` as an int; None where it is not a finite number."""
    value = num(x)
    return int(value) if math.isfinite(value) else None


def text(x: Any, missing: str = "?") -> str:
    """``str(x)``, or ``missing`` for None."""
    return missing if x is None else str(x)


def fmt(x: Any, spec: str = ".4g", missing: str = "-") -> str:
    """A number formatted with ``spec``; ``missing`` for None or a non-number, "nan"/"inf" as such."""
    if x is None:
        return missing
    value = num(x)
    if math.isnan(value):
        return "nan" if isinstance(x, float) or hasattr(x, "item") else missing
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return format(value, spec)


def pct(x: Any) -> str:
    """A fraction (0..1) as "12.3 %"."""
    value = num(x)
    return f"{100 * value:.1f} %" if math.isfinite(value) else fmt(x)


def duration(seconds: Any) -> str:
    """Seconds as "12.3 s", "2 min 05 s" or "1 h 02 min"; "?" for a non-number."""
    s = num(seconds)
    if not math.isfinite(s):
        return "?"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def plural(n: int, word: str) -> str:
    """"1 epoch", "2 epochs"."""
    return f"{n} {word}{'' if n == 1 else 's'}"


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
