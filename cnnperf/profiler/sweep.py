"""The batch-size sweep of the recommended variant: :func:`batch_sweep` times one copy of it at growing batch
sizes (doubling from the profiled size with ``"auto"``, else a given list) until out of memory, flat throughput,
the end of the list or the time budget, every choice made on numbers all ranks agree on. Imports torch and the
profiler's measure, ranks and variants; the copy comes from a factory the caller passes.
"""

from __future__ import annotations

import gc
import time
from typing import Callable

import torch

from cnnperf._timing import quantiles
from cnnperf.profiler import measure, ranks
from cnnperf.profiler.variants import Prepared, compile_config, global_switches, variant_name

SWEEP_DOUBLINGS = {"cpu": 3, "cuda": 6}  # automatic sweep: batch x2, x4, ... up to x8 (CPU) or x64 (GPU)
SWEEP_FLAT_GAIN = 0.02  # stop doubling after two sizes that each gained less than 2 % throughput
SWEEP_STEPS = 10


def batch_sweep(options, make: Callable[[], Prepared], loss_fn: Callable, batch, device: torch.device, *,
                batch_sizes, steps: int, warmup: int, world: int, budget: float | None, clock: float,
                log: Callable[[str], None]) -> dict | None:
    """The batch_sweep record (SCHEMA.md) of variant ``options`` on ``batch`` (the first check batch, repeated
    to each size), or None when ``batch_sizes`` is None.

    - ``make()``: a fresh copy of the variant (called once, under its switches and compile settings).
    - ``batch_sizes``: "auto" or a list of sizes; ``steps``/``warmup``: the profile's (at most SWEEP_STEPS timed
      steps, at least 2 warm-up steps per size).
    - ``world``: ranks (images per second count all of them); ``budget``: seconds since ``clock``
      (``time.perf_counter()`` at the start) after which no size starts; ``log``: a line of progress per size.
    """
    if batch_sizes is None:
        return None
    x, y = batch
    if not isinstance(y, torch.Tensor) or y.shape[:1] != x.shape[:1]:
        return {"variant": variant_name(options), "rows": [], "largest_fitting": None, "best_batch_size": None,
                "error": "targets are not a tensor with one row per input: no batch-size sweep"}
    base = x.shape[0]
    if batch_sizes == "auto":
        sizes = [base << k for k in range(SWEEP_DOUBLINGS.get(device.type, 3) + 1)]
    else:
        sizes = list(batch_sizes)
    rows, flat = [], 0
    if budget is not None and ranks.agree(time.perf_counter() - clock > budget, world):
        return {"variant": variant_name(options), "rows": [], "largest_fitting": None, "best_batch_size": None,
                "error": f"not run: over the time budget of {budget:g} s"}
    log(f"batch-size sweep of {variant_name(options)}: {', '.join(map(str, sizes))}")
    prep = None
    try:
        with global_switches(options, device), compile_config(options):
            # One copy for all sizes: a compiled variant compiles once per size (static shapes, as in the
            # search), not once per size and copy.
            prep = make()
            stopped = "cap" if batch_sizes == "auto" else "end of list"
            for size in sizes:
                if budget is not None and ranks.agree(time.perf_counter() - clock > budget, world):
                    stopped = "budget"
                    break
                row = _sweep_one(prep, loss_fn, x, y, size, device, steps=steps, warmup=warmup, world=world,
                                 log=log)
                rows.append(row)
                if row["status"] != "ok":
                    stopped = row["status"]
                    break
                ok = [r for r in rows if r["status"] == "ok"]
                if batch_sizes == "auto" and len(ok) >= 2:
                    gained = ok[-1]["images_per_s"] >= ok[-2]["images_per_s"] * (1 + SWEEP_FLAT_GAIN)
                    flat = 0 if gained else flat + 1
                    if flat >= 2:
                        stopped = "flat"
                        break
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # the copy could not be made: a sweep with no row, and why
        return {"variant": variant_name(options), "rows": rows, "largest_fitting": None,
                "best_batch_size": None, "error": measure.one_line(exc)}
    finally:
        del prep
        if device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
    ok = [r for r in rows if r["status"] == "ok"]
    # The largest that fits is known only when a larger one ran out of memory.
    fitting = max((r["batch_size"] for r in ok), default=None) if stopped == "oom" else None
    best = max(ok, key=lambda r: r["images_per_s"]) if ok else None
    return {"variant": variant_name(options), "rows": rows, "largest_fitting": fitting,
            "best_batch_size": best["batch_size"] if best else None,
            "best_within_noise_of": _within_noise(best, ok) if best else [], "stopped": stopped}


def _within_noise(best: dict, ok: list[dict]) -> list[int]:
    """The other sizes whose images/s spread (p20-p80 of the steps) reaches the best's: the best is not clearly
    better than those."""
    low = best["images_per_s_p20_p80"][0]
    return [r["batch_size"] for r in ok if r is not best and r["images_per_s_p20_p80"][1] >= low]


def _sweep_one(prep: Prepared, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor, size: int, device: torch.device,
               *, steps: int, warmup: int, world: int, log: Callable[[str], None]) -> dict:
    """One size of the sweep: a row of batch_sweep.rows (SCHEMA.md), as all ranks agree on it."""
    row = {"batch_size": size, "status": "ok", "median_ms": None, "p20_ms": None, "p80_ms": None,
           "images_per_s": None, "images_per_s_p20_p80": None, "peak_memory": None, "error": None}
    batch = None
    try:
        repeats = -(-size // x.shape[0])
        batch = (_repeat(x, repeats, size).to(device), _repeat(y, repeats, size).to(device))
        times = measure.timed_steps(prep, loss_fn, measure.batch_source(prep, batch),
                                    min(steps, SWEEP_STEPS), max(warmup, 2))
        median = times.median()
        p20, p80 = quantiles(times.steps, [0.2, 0.8])
        row.update(median_ms=median, p20_ms=p20, p80_ms=p80, images_per_s=size * world / (median / 1e3),
                   images_per_s_p20_p80=[size * world / (p80 / 1e3), size * world / (p20 / 1e3)],
                   peak_memory=times.peak_memory)
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        prep.optimizer.zero_grad(set_to_none=True)  # the gradients of a step that failed half-way
        row.update(status="oom" if measure.is_oom(exc) else "failed", error=measure.one_line(exc))
    finally:
        del batch
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if world > 1:  # every rank records the same row: the first that failed, else the slowest
        rows = ranks.all_gather(row, world)
        row = next((r for r in rows if r["status"] != "ok"), max(rows, key=lambda r: r["median_ms"]))
    log(f"  batch {size}: " + (f"{row['images_per_s']:.0f} images/s" if row["status"] == "ok"
                               else row["status"] + f" ({row['error']})"))
    return row


def _repeat(t: torch.Tensor, repeats: int, size: int) -> torch.Tensor:
    return t.repeat(repeats, *([1] * (t.dim() - 1)))[:size]
