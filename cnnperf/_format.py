"""Numbers and names as records and reports show them. No torch.

Reading values that may be missing (a record cut short by Ctrl-C): :func:`num` (a float, NaN where there is
none), :func:`finite` (a finite float, or None), :func:`int_or_none`, :func:`text`. Writing them: :func:`sig`
(significant digits, for JSON), :func:`fmt`, :func:`pct`, :func:`duration`, :func:`plural`. Names:
:func:`dtype_name`.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any


def sig(x: float, digits: int = 5) -> float:
    """``x`` to ``digits`` significant digits: JSON stays readable without losing small CPU figures."""
    return float(f"{x:.{digits}g}")


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


def finite(x: Any) -> float | None:
    """:func:`num` where it is finite; None for None, NaN, inf and anything that is not a number."""
    value = num(x)
    return value if math.isfinite(value) else None


def int_or_none(x: Any) -> int | None:
    """:func:`num` as an int; None where it is not a finite number."""
    value = num(x)
    return int(value) if math.isfinite(value) else None


def text(x: Any, missing: str = "?") -> str:
    """``str(x)``, or ``missing`` for None."""
    return missing if x is None else str(x)


def fmt(x: Any, spec: str = ".4g", missing: str = "-") -> str:
    """A number formatted with ``spec`` (an int as an int); ``missing`` for None or a non-number, "nan"/"inf"
    as such."""
    if x is None:
        return missing
    if isinstance(x, int) and not isinstance(x, bool):
        return format(x, spec)
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


def dtype_name(dtype) -> str:
    """torch.bfloat16 -> 'bfloat16'."""
    return str(dtype).removeprefix("torch.")
