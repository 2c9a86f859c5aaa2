"""Writing files so that nothing is ever half written: strict JSON and text, atomically.

:func:`jsonable` turns a record into what strict JSON can hold (NaN/inf -> null, tensors and numpy values ->
numbers and lists, paths -> strings); :func:`write_json_atomic` writes it; :func:`write_text_atomic` writes any
text (a temporary file in the same directory, fsync, ``os.replace``; the temporary file removed on any error).
No torch.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import uuid
from pathlib import Path
from typing import Any, Mapping


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


def write_json_atomic(path: str | os.PathLike, record: Any) -> None:
    """``jsonable(record)`` to ``path`` as strict JSON (``allow_nan=False``, indent 1, a final newline),
    atomically: a reader sees the old file or the new one, never half of one."""
    write_text_atomic(path, json.dumps(jsonable(record), indent=1, allow_nan=False) + "\n")  # dumps fails first


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """``text`` to ``path`` through a temporary file in the same directory (``os.replace`` is atomic only within
    a file system), flushed to disk, then renamed over ``path``; on any error the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as f:  # "x": never clobbers; permissions follow the umask
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
