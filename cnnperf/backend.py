"""Which implementation runs an op: the Triton kernels or the reference PyTorch ops.

Rules (the same for every op):
- CUDA tensors run the Triton kernels; CPU tensors run the reference ops, except with ``TRITON_INTERPRET=1``,
  where the same Triton kernels run on CPU tensors through Triton's interpreter (how CI tests the kernels),
  unless that interpreter cannot run here (:func:`interpreter_problem`).
- ``CNNPERF_BACKEND=auto|triton|reference`` (or :func:`override`) forces a choice. ``triton`` on a case the
  kernels do not cover raises :class:`UnsupportedError` naming the argument; it never falls back silently.
  ``auto`` sends such a case to the reference op with one warning per case, never a wrong result.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import warnings
from typing import Iterator

BACKENDS = ("auto", "triton", "reference")

_local = threading.local()
_warned: set[str] = set()
_warned_lock = threading.Lock()


class UnsupportedError(RuntimeError):
    """A case the Triton kernels do not cover was forced onto them with ``backend='triton'``."""


@functools.cache
def has_triton() -> bool:
    """Whether Triton imports here (it is a Linux-only dependency)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpret() -> bool:
    """Whether Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``).

    Triton reads the flag when a kernel is defined, so it must be set before ``cnnperf.kernels`` is imported.
    """
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def requested() -> str:
    """The backend asked for: the innermost :func:`override`, else ``CNNPERF_BACKEND``, else ``auto``."""
    name = getattr(_local, "override", None) or os.environ.get("CNNPERF_BACKEND", "auto") or "auto"
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"CNNPERF_BACKEND must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name


@contextlib.contextmanager
def override(name: str) -> Iterator[None]:
    """Force a backend inside a ``with`` block (this thread only): ``with override("reference"): ...``."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {name!r}")
    previous = getattr(_local, "override", None)
    _local.override = name
    try:
        yield
    finally:
        _local.override = previous


def _version(text: str) -> tuple[int, int]:
    major, minor = (text.split("+")[0].split(".") + ["0"])[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


@functools.cache
def interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run the kernels here (a sentence), or None.

    Triton 3.6 and older turn one-element NumPy arrays into ints with ``int()``, which NumPy 2.4 made an
    error: every kernel that loops up to a bound computed from its arguments stops with "only 0-dimensional
    arrays can be converted to Python scalars" (triton-lang/triton#9171; fixed in Triton 3.7.0, measured
    here with triton 3.6.0 + numpy 2.4.6: all kernel tests fail; + numpy 2.3.5: all pass).
    """
    import triton

    try:
        import numpy
    except ImportError:
        return None
    if _version(triton.__version__) < (3, 7) and _version(numpy.__version__) >= (2, 4):
        return (f"Triton {triton.__version__}'s interpreter cannot run with NumPy {numpy.__version__} (it converts "
                f"one-element arrays to ints, an error since NumPy 2.4; fixed in Triton 3.7): install "
                f"'numpy<2.4' or 'triton>=3.7' to run the kernels with TRITON_INTERPRET=1")
    return None


def device_runs_triton(device_type: str) -> bool:
    """Whether Triton kernels can run on tensors of this device type here."""
    if not has_triton():
        return False
    if device_type == "cuda":
        return True
    return device_type == "cpu" and interpret()


def choose(op: str, device_type: str, unsupported: str | None) -> str:
    """Pick ``"triton"`` or ``"reference"`` for one call of ``op``.

    ``unsupported`` is ``None`` when the kernels cover the call, else a sentence naming what they do not
    cover (the argument and its value); it becomes the error under ``triton`` and the warning under ``auto``.
    """
    name = requested()
    if name == "reference":
        return "reference"
    if not device_runs_triton(device_type):
        if name == "triton":
            raise UnsupportedError(
                f"{op}: CNNPERF_BACKEND=triton, but Triton kernels cannot run on {device_type} tensors here "
                f"(triton installed: {has_triton()}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')})"
            )
        return "reference"
    if unsupported is None and device_type == "cpu":
        unsupported = interpreter_problem()
    if unsupported is not None:
        if name == "triton":
            raise UnsupportedError(f"{op}: CNNPERF_BACKEND=triton, but {unsupported}")
        warn_once(f"{op}: {unsupported}; using the reference PyTorch op for this case")
        return "reference"
    return "triton"


def quiet_interpreter():
    """A context for launching kernels: under ``TRITON_INTERPRET=1`` they compute with NumPy, which warns about
    the inf/NaN arithmetic (overflow, invalid value) that a GPU does silently; those warnings are silenced. Off
    the interpreter it does nothing."""
    if not interpret():
        return contextlib.nullcontext()
    import numpy

    return numpy.errstate(over="ignore", invalid="ignore", divide="ignore")


def warn_once(message: str) -> None:
    """Emit ``message`` as a warning the first time it is seen in this process."""
    with _warned_lock:
        if message in _warned:
            return
        _warned.add(message)
    warnings.warn(message, stacklevel=3)
