"""Timing a call and summarising the times: the one implementation every tool measures with.

:func:`time_host` (a host clock, synchronising the device around every call), :func:`time_cuda`
(``triton.testing.do_bench``: CUDA events, L2 flushed), :func:`time_cuda_with_reset` (do_bench's method with a
set-up call outside the events), each giving a :class:`Timing`; :func:`quantiles` (linear interpolation, as
numpy and torch), :func:`geomean`, :func:`synchronize`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

L2_FLUSH_BYTES = 256 << 20  # what do_bench zeroes before each timed call


@dataclass(frozen=True)
class Timing:
    """One measurement, in milliseconds per call."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    min_ms: float | None = None  # our own timers only
    reps: int | None = None  # None: chosen inside do_bench


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a host clock would otherwise time the launch only)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quantiles(values: Sequence[float], qs: Sequence[float]) -> list[float]:
    """The ``qs`` quantiles of ``values`` (linear interpolation between order statistics, as numpy's default);
    NaN for each when there are no values."""
    ordered = sorted(values)
    if not ordered:
        return [math.nan] * len(qs)
    out = []
    for q in qs:
        pos = q * (len(ordered) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(ordered) - 1)
        out.append(ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo))
    return out


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (see :func:`quantiles`); NaN for none."""
    return quantiles(values, [q])[0]


def p20_p80(values: Sequence[float], scale: float = 1.0) -> list[float]:
    """The 20 % and 80 % quantiles of ``values``, times ``scale`` (1e3: seconds -> ms)."""
    return [q * scale for q in quantiles(values, (0.2, 0.8))]


def geomean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _timing(times_ms: Sequence[float], reps: int | None) -> Timing:
    p20, p50, p80 = quantiles(times_ms, (0.2, 0.5, 0.8))
    return Timing(p50, p20, p80, min(times_ms), reps)


def time_host(call: Callable[[], None], device: torch.device, reset: Callable[[], None] | None = None,
              budget_s: float = 0.5, min_reps: int = 5, max_reps: int = 100) -> Timing:
    """Median and 20/80 % quantiles of ``call`` by ``time.perf_counter``, synchronising around every call.

    Two untimed warm-up calls, then as many timed calls as fit in ``budget_s`` (within [min_reps, max_reps]).
    ``reset`` runs before every call, outside the timed region.
    """
    def once() -> float:
        if reset is not None:
            reset()
        synchronize(device)
        start = time.perf_counter()
        call()
        synchronize(device)
        return time.perf_counter() - start

    once()
    estimate = once()
    reps = int(max(min_reps, min(max_reps, budget_s / max(estimate, 1e-6))))
    return _timing([once() * 1e3 for _ in range(reps)], reps)


def time_cuda(call: Callable[[], None], grad_to_none: Sequence[torch.Tensor] | None = None) -> Timing:
    """Median and 20/80 % quantiles of ``call`` with ``triton.testing.do_bench`` (CUDA events, L2 flushed)."""
    import triton.testing

    p20, p50, p80 = triton.testing.do_bench(call, warmup=25, rep=100, grad_to_none=grad_to_none,
                                            quantiles=[0.2, 0.5, 0.8])
    return Timing(p50, p20, p80)


def time_cuda_with_reset(call: Callable[[], None], reset: Callable[[], None], rep_ms: float = 100.0,
                         reps: int | None = None, warmup_ms: float = 25.0, min_reps: int = 10,
                         max_reps: int = 1000) -> Timing:
    """``triton.testing.do_bench``'s method (CUDA events around each call, L2 zeroed before it) with ``reset``
    run before every call, outside the events; do_bench has no per-call set-up hook.

    ``reps``: timed calls; None: as many as fit in ``rep_ms`` (within [min_reps, max_reps]), after about
    ``warmup_ms`` of warm-up calls.
    """
    flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")

    def timed(n: int) -> list[float]:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for start, end in events:
            reset()
            flush.zero_()
            start.record()
            call()
            end.record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in events]

    estimate = max(quantile(timed(5), 0.5), 1e-3)
    if reps is None:
        timed(max(1, int(warmup_ms / estimate)))
        reps = max(min_reps, min(max_reps, int(rep_ms / estimate)))
    return _timing(timed(reps), reps)
