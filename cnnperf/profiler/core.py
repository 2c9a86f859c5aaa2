"""``cnnperf.profile`` and the run behind it: :func:`profile`, :class:`ProfileResult`, the argument checks, and
:class:`_Profiler`'s search, confirmation and measure loop. It orchestrates; the decisions and the parts are other
modules': :mod:`~cnnperf.profiler.policy` (what to recommend), :mod:`~cnnperf.profiler.measure` (one variant),
:mod:`~cnnperf.profiler.sweep` (the batch sizes), :mod:`~cnnperf.profiler.ranks` (torch.distributed) and
:mod:`~cnnperf.profiler.random_state`. It imports those, :mod:`~cnnperf.profiler.step`,
:mod:`~cnnperf.profiler.variants` and the record's SCHEMA from :mod:`~cnnperf.profiler.report`; of the
profiler's modules only the package, :mod:`~cnnperf.profiler.apply` and the CLI import it.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import gc
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from cnnperf import _malloc
from cnnperf._timing import quantile
from cnnperf.profiler import measure, ranks
from cnnperf.profiler.policy import (
    DEFAULT_BUDGET_S,
    MIN_GAIN,
    busy,
    data_bound,
    data_fraction,
    describe,
    drifting_allocator,
    gain,
    recommend,
    sound,
)
from cnnperf.profiler.random_state import RandomState
from cnnperf.profiler.report import SCHEMA
from cnnperf.profiler.step import split_batch, to_device
from cnnperf.profiler.sweep import batch_sweep
from cnnperf.profiler.variants import (
    BASELINE,
    CHECK_BOUNDS,
    DEFAULT_EXCLUDED_ON_CPU,
    OPTIONS,
    VariantError,
    compatible,
    compile_config,
    global_switches,
    not_applicable,
    parse_variant,
    precision,
    prepare,
    rebuild_loader,
    tf32_enabled,
    unwrap_ddp,
    variant_name,
)

DEFAULT_STEPS = 20
DEFAULT_WARMUP = 3
DEFAULT_CHECK_STEPS = 2
COMPILE_GUESS_S = 30.0  # what a first torch.compile of a small CNN's training step takes (20-40 s on 2 CPU cores)
MAX_AUTOTUNE_FACTOR = 4.0
# The confirmation: the baseline and the search's fastest variants (its contenders) timed again in turns, round
# by round, each first in its share of the rounds; the winner is the contender with the highest median of the
# rounds' ratios, the headline that median, its spread their p20-p80. On this 2-core CPU the machine's speed
# moves in phases of seconds that slow fp32 eager and not bf16 (the ConvNet's eager step: 17 ms for 3 s, then
# 24 ms for 4 s, with nothing else running), so that a sub-second confirmation measured one phase's ratio
# (1.9-2.8x for the same pair in eight runs): the rounds go on for CONFIRM_MIN_S seconds (at least CONFIRM_ROUNDS,
# at most CONFIRM_MAX_ROUNDS) to span several phases.
CONFIRM_ROUNDS = 6
CONFIRM_MIN_S = 6.0
CONFIRM_MAX_ROUNDS = 60
CONFIRM_STEPS = 5
# Contenders: the CONFIRM_CONTENDERS fastest sound variants of the search within RUNOFF_FACTOR of the fastest.
# One pass of 20 steps misjudges a variant by up to 35 % in a slow phase (bf16 alone 1.86x in a search, 1.38x
# in turns; bf16 + channels_last 1.75x in a search, 2.0-2.7x in turns), so that the search's order of two close
# variants is a coin toss, and the runoff in turns decides.
CONFIRM_CONTENDERS = 3
RUNOFF_FACTOR = 1.5
# ... and no more of them than CONFIRM_ROUNDS rounds fit in CONFIRM_MAX_S by their search medians (the fastest
# always runs): ResNet-50 at batch 128 on a GPU takes a few hundred ms a step, and the GPU check gives its whole
# profile 100 s.
CONFIRM_MAX_S = 15.0
# After every variant of the search the baseline is timed again for this many steps: the variant's speed-up is
# over the baseline's blocks just before and just after it (B V B V B ...), so that drift and load during the
# search hit both sides (the baseline once measured 34.9 ms at the start of a run and 840 ms at its end).
BASELINE_BLOCK_STEPS = 5
# A variant's timed steps stop early, after at least MIN_TIMED_STEPS, once they have taken TIME_CAP_FACTOR times
# what the baseline's took (and at least TIME_CAP_MIN_S): bf16 on a CPU without bf16 units is 10x slower, and
# 20 steps of it would only say so at length.
TIME_CAP_FACTOR = 3.0
TIME_CAP_MIN_S = 2.0
# Singles are measured cheapest first, so that a tight budget still covers most of them.
SINGLE_ORDER = ("workers", "cudnn_benchmark", "tf32", "channels_last", "fuse", "bf16", "fp16", "compile",
                "max_autotune")


class ProfileError(RuntimeError):
    """The profile cannot run at all: the baseline training step itself fails."""


class ProfileInterrupted(KeyboardInterrupt):
    """Ctrl-C during profiling; ``result`` holds what was measured until then (its record says interrupted)."""

    def __init__(self, result: "ProfileResult"):
        super().__init__("profiling interrupted")
        self.result = result


@dataclass
class ProfileResult:
    """What :func:`profile` measured: ``record`` is the profile.json dict (see SCHEMA.md)."""

    record: dict

    @property
    def variants(self) -> list[dict]:
        """One row per variant, in the order measured."""
        return self.record.get("variants", [])

    @property
    def recommended(self) -> str:
        """The variant to use (a name for :func:`cnnperf.optimize`); "eager" when nothing beat the baseline."""
        return (self.record.get("recommendation") or {}).get("variant", BASELINE)

    @property
    def speedup(self) -> float | None:
        return (self.record.get("recommendation") or {}).get("speedup")

    def row(self, name: str) -> dict:
        """The row of variant ``name`` (any spelling of its options); KeyError if it was not measured."""
        name = variant_name(parse_variant(name))
        for row in self.variants:
            if row["name"] == name:
                return row
        raise KeyError(f"variant {name!r} was not measured; measured: {', '.join(r['name'] for r in self.variants)}")

    def save(self, out_dir, console=None) -> dict:
        """Write profile.json and report.html into ``out_dir`` (and print the summary to ``console``); a trace
        path in the record is written relative to ``out_dir``."""
        from cnnperf.profiler.report import write_reports

        record = self.record
        if record.get("trace"):
            record = {**record, "trace": os.path.relpath(os.path.abspath(record["trace"]), os.path.abspath(out_dir))}
        return write_reports(record, out_dir, console=console)

    def print(self, console=None) -> None:
        """The terminal summary (a rich Console on stdout by default)."""
        from cnnperf._terminal import make_console
        from cnnperf.profiler.report import render_terminal

        render_terminal(self.record, console or make_console())

    def __str__(self) -> str:
        from cnnperf.profiler.report import summary_line

        return summary_line(self.record)


def profile(model: nn.Module, loss_fn: Callable, batch_or_loader, optimizer_factory: Callable, *,
            variants: str | Sequence[str] | None = None, steps: int = DEFAULT_STEPS, warmup: int = DEFAULT_WARMUP,
            check_steps: int = DEFAULT_CHECK_STEPS, budget: float | str | None = "auto",
            batch_sizes: str | Sequence[int] | None = "auto", device=None, seed: int = 0, top_ops: bool = True,
            trace=None, log: Callable[[str], None] | None = None, verbose: bool = True,
            run_info: dict | None = None) -> ProfileResult:
    """Measure training-step variants of ``model`` side by side and recommend the fastest numerically sound one.

    - ``model``: the user's model (an ``nn.Module``, or a ``DistributedDataParallel`` around one); only copied.
    - ``loss_fn(output, targets) -> scalar tensor``.
    - ``batch_or_loader``: one batch ``(inputs, targets)`` (timed steps reuse it: no data wait), or a
      ``DataLoader`` yielding such batches (its settings are the baseline's; the "workers" option tunes them).
    - ``optimizer_factory(parameters) -> Optimizer``, e.g. ``lambda p: torch.optim.SGD(p, lr=0.1)`` or
      ``torch.optim.Adam``; called once per variant on that variant's copy.
    - ``variants``: option names or variant names ("bf16", "channels_last", "bf16+channels_last"), "all", or None
      (every option that applies here, except max_autotune on the CPU). Combinations are searched greedily
      among the options that beat the baseline.
    - ``steps`` timed steps per variant after ``warmup`` untimed ones; ``check_steps`` batches for the numerical
      check (loss and gradients against the baseline from the same weights).
    - ``budget``: seconds; no new combination (or single, once over) starts after it. "auto" (default): the
      command line's, :data:`DEFAULT_BUDGET_S` for the device (90 s on a CPU, 300 s on a GPU). None: no limit.
    - ``batch_sizes``: "auto" (double the batch size until out of memory, flat throughput or the cap), a list,
      or None (no sweep). Off by default under torch.distributed (an OOM on one rank would stall the others).
    - ``device``: where to run (default: the model's device). ``seed``: for dropout in the check.
    - ``top_ops``: profile a few steps of the recommended variant with torch.profiler; ``trace``: a path to
      write their Chrome/Perfetto trace to.
    - ``log``: called with a line of progress per variant; without it, with ``verbose`` (default) the lines go
      to stderr, prefixed ``cnnperf.profile:``; ``verbose=False`` runs silently.

    The process-wide switches (TF32, cudnn.benchmark) and the random states are as before on return; after a
    compiled variant, torch.compile's caches are reset (``torch._dynamo.reset()``), so that a later compile
    of the user's model starts clean instead of meeting the profile's entries.

    Returns a :class:`ProfileResult`. Raises :class:`ProfileError` if the baseline step itself fails,
    ``ValueError``/``TypeError`` for bad arguments, :class:`ProfileInterrupted` on Ctrl-C (with the partial
    result).
    """
    if log is None and verbose:
        def log(line: str) -> None:
            print(f"cnnperf.profile: {line}", file=sys.stderr, flush=True)
    return _Profiler(model, loss_fn, batch_or_loader, optimizer_factory, variants=variants, steps=steps,
                     warmup=warmup, check_steps=check_steps, budget=budget, batch_sizes=batch_sizes, device=device,
                     seed=seed, top_ops=top_ops, trace=trace, log=log, run_info=run_info).run()


# ---------------------------------------------------------------------------------------------------------
# Argument checks.
# ---------------------------------------------------------------------------------------------------------

def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def requested_options(variants, device: torch.device, loader) -> tuple[list[str], list[tuple[str, ...]],
                                                                          dict[str, str]]:
    """Resolve ``variants`` into (options to measure alone, extra combinations asked for by name, options
    left out as not applicable here -> why)."""
    if variants is None or variants == "all":
        names = [o for o in OPTIONS if variants == "all" or
                 not (device.type != "cuda" and o in DEFAULT_EXCLUDED_ON_CPU)]
    elif isinstance(variants, str):
        names = [v.strip() for v in variants.split(",") if v.strip()]
    else:
        names = list(variants)
    singles, combos, skipped = [], [], {}
    for name in names:
        try:
            options = parse_variant(name)
        except VariantError as e:
            raise ValueError(f"variants: {e}") from None
        for option in options:
            reason = not_applicable(option, device, loader)
            if reason is not None:
                skipped[option] = reason
        if len(options) == 1 and options[0] not in singles:
            singles.append(options[0])
        elif len(options) > 1 and options not in combos:
            combos.append(options)
    singles = [o for o in SINGLE_ORDER if o in singles]
    return singles, combos, skipped


# ---------------------------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------------------------

class _Profiler:
    """The run: the baseline (eager float32, the user's loader as it is); every requested option on its own;
    then greedy combinations of the options that beat the baseline (each round adds the option that helps most,
    while it helps by MIN_GAIN or more and the time budget lasts); the recommendation and its confirmation; the
    top ops of the recommended variant (and its trace); a batch-size sweep of it. Every variant is built from
    copies (:func:`cnnperf.profiler.variants.prepare`), checked against the baseline's loss and gradients, then
    timed. A variant that raises is recorded with its error and the run goes on; the torch, CUDA, Python and
    NumPy random states and the loaders' generators are put back at the end, and the user's model and optimizer
    are never used for anything but copying.

    Under torch.distributed (torchrun, DDP), every rank measures the same variants in the same order, and every
    choice is made from the numbers gathered from all ranks (:mod:`cnnperf.profiler.ranks`), so that all ranks
    take the same path. A variant that fails on every rank, or on one rank outside a collective, is recorded like
    any failure; one that fails on one rank *inside* a DDP step (out of memory in the backward pass) leaves the
    other ranks waiting in the all-reduce until the process group's timeout: that cannot be recovered from here.
    """

    def __init__(self, model, loss_fn, data, optimizer_factory, *, variants, steps, warmup, check_steps, budget,
                 batch_sizes, device, seed, top_ops, trace, log, run_info):
        from torch.utils.data import DataLoader

        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable (output, targets) -> loss, got {type(loss_fn).__name__}")
        if not callable(optimizer_factory):
            raise TypeError("optimizer_factory must be callable (parameters) -> torch.optim.Optimizer, got "
                            f"{type(optimizer_factory).__name__}")
        self.steps = _positive_int("steps", steps, 2)
        self.warmup = _positive_int("warmup", warmup, 0)
        self.check_steps = _positive_int("check_steps", check_steps)
        if budget is not None and budget != "auto" and not (
                isinstance(budget, (int, float)) and budget > 0 and math.isfinite(budget)):
            raise ValueError(f"budget must be a positive number of seconds, 'auto' or None, got {budget!r}")
        inner, self.ddp = unwrap_ddp(model)
        self.world, self.rank = ranks.world_and_rank()
        params = list(inner.parameters())
        if not any(p.requires_grad for p in params):
            raise ValueError("model has no parameter that requires a gradient: there is no training step to time")
        self.device = torch.device(device) if device is not None else (params[0].device if params else
                                                                       torch.device("cpu"))
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.budget = (DEFAULT_BUDGET_S["cuda" if self.device.type == "cuda" else "cpu"] if budget == "auto"
                       else budget)
        self.loader = data if isinstance(data, DataLoader) else None
        if self.loader is None:
            split_batch(data, "batch_or_loader")
            self.batch = to_device(tuple(data), self.device, non_blocking=False)
        self.model, self.loss_fn, self.optimizer_factory = inner, loss_fn, optimizer_factory
        if self.device.type == "cuda":
            torch.cuda.init()  # now, so that its random state is saved (and put back) with the others
        with _on_device(self.device):
            resolved = requested_options(variants, self.device, self.loader)
            self.tf32 = tf32_enabled(self.device)  # the baseline's switches: as the user left them
        # Every rank must measure the same list (CPU affinity, hence "workers", can differ between nodes).
        self.singles, self.combos, self.not_applicable = ranks.agree(resolved, self.world)
        self.variants_requested = ([variants] if isinstance(variants, str) else
                                   list(variants) if variants is not None else ["default"])
        if batch_sizes == "auto":
            self.batch_sizes = "auto" if self.world == 1 else None
        elif batch_sizes is None:
            self.batch_sizes = None
        else:
            self.batch_sizes = [_positive_int("batch_sizes[]", b) for b in batch_sizes]
        self.seed, self.want_top_ops, self.trace, self.run_info = seed, top_ops, trace, dict(run_info or {})
        self.log = log or (lambda line: None)
        self.rows: list[dict] = []
        # name -> (row, Prepared) kept for the confirmation: the baseline's and the CONFIRM_CONTENDERS fastest
        # sound variants' (without copying and compiling them again)
        self.kept: dict[str, tuple[dict, object]] = {}
        self.reference = None
        self.baseline_block_ms = None  # the baseline's latest timing (see _baseline_around)
        self.clock = time.perf_counter()

    # -- the whole run ------------------------------------------------------------------------------------
    def run(self) -> ProfileResult:
        started = _dt.datetime.now(_dt.timezone.utc)
        rng = RandomState(self.loader)
        record = {"schema": SCHEMA}
        interrupted = False
        try:
            with _on_device(self.device):  # CUDA events, streams and allocations on self.device, not cuda:0
                self.template = copy.deepcopy(self.model).train()
                self.check_batches = self._check_batches()
                record["run"] = self._run_facts(started)
                record["peak_tflops"] = measure.peak_tflops(record["run"]["device_name"])
                record["variants"] = self.rows
                record["baseline"] = BASELINE
                self._search(record)
                record["recommendation"] = recommend(self.rows)
                self._confirm(record)
                self._drop_kept()  # before the sweep: its largest batch gets the memory they held
                self._after(record)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            self._drop_kept()
            rng.restore()
            if any(OPTIONS[o].compiles for r in self.rows for o in r["options"]):
                # The copies compiled here left entries in Dynamo's caches (on the model class's forward): a
                # torch.compile of the user's own model could hit the recompile limit and silently run eager.
                import torch._dynamo

                torch._dynamo.reset()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        run = record.setdefault("run", {})
        run.update(elapsed_s=time.perf_counter() - self.clock, interrupted=interrupted,
                   finished=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        if interrupted and "recommendation" not in record and self.rows:
            record["recommendation"] = recommend(self.rows)
        result = ProfileResult(record)
        if interrupted:
            raise ProfileInterrupted(result)
        return result

    def _check_batches(self) -> list:
        if self.loader is None:
            return [self.batch]
        batches = []
        for batch in rebuild_loader(self.loader, num_workers=0):
            batches.append(tuple(split_batch(batch, "a batch of the loader")))
            if len(batches) == self.check_steps:
                break
        if not batches:
            raise ValueError("batch_or_loader: the DataLoader yielded no batch")
        return batches

    def _run_facts(self, started) -> dict:
        from cnnperf._env import cpu_count, device_name, versions

        x, _ = self.check_batches[0]
        facts = {"model": type(self.model).__name__, "data": "loader" if self.loader is not None else "batch",
                 "device": str(self.device), "device_name": device_name(self.device), "batch_size": int(x.shape[0]),
                 "input_shape": list(x.shape), "steps": self.steps, "warmup": self.warmup,
                 "check_steps": len(self.check_batches), "budget_s": self.budget,
                 "started": started.isoformat(timespec="seconds"), "interrupted": False,
                 "parameters": sum(p.numel() for p in self.model.parameters()), "world_size": self.world,
                 "variants_requested": self.variants_requested, "versions": versions(),
                 "loss_fn": getattr(self.loss_fn, "__name__", type(self.loss_fn).__name__),
                 "optimizer": None, "seed": self.seed,
                 "num_workers": self.loader.num_workers if self.loader is not None else None,
                 "cpu_count": cpu_count(), "load_average": self._ranks_load_average(), "tf32": self.tf32,
                 "dynamic_mmap_threshold": _malloc.dynamic_mmap_threshold() if self.device.type == "cpu" else None,
                 "cudnn_benchmark": bool(torch.backends.cudnn.benchmark) if self.device.type == "cuda" else None}
        facts.update(self.run_info)
        return facts

    def _ranks_load_average(self) -> float | None:
        """The highest 1-minute load average among the ranks' machines (a busy one slows every rank's step),
        the same on every rank so that the summary's note on load is."""
        loads = [load for load in ranks.all_gather(_load_average(), self.world) if load is not None]
        return max(loads) if loads else None

    # -- the search -----------------------------------------------------------------------------------------
    def _search(self, record: dict) -> None:
        baseline = self._measure((), "baseline")  # gathered: under DDP every rank sees a failure on any
        if baseline["status"] != "ok":
            raise ProfileError(f"the baseline training step (eager float32) fails: {baseline['error']}")
        record["run"]["optimizer"] = self.optimizer_name
        for option, reason in self.not_applicable.items():
            self.rows.append(_row((option,), "single", status="not_applicable", reason=reason))
        for option in self.singles:
            if option not in self.not_applicable:
                self._measure((option,), "single")
        fraction = data_fraction(baseline)
        if (fraction is not None and data_bound(baseline) and "workers" not in self.singles
                and "workers" not in self.not_applicable and self.loader is not None):
            reason = not_applicable("workers", self.device, self.loader)
            if reason is None:
                self.log(f"the data wait is {fraction:.0%} of the baseline step: measuring the loader options")
                self._measure(("workers",), "loader")
        for options in self.combos:
            if self._find(options) is not None:
                continue
            blocked = next((o for o in options if o in self.not_applicable), None)
            if blocked is None:
                self._measure(options, "combination")
            else:  # asked for by name: say why it did not run
                self.rows.append(_row(options, "combination", status="not_applicable",
                                      reason=f"{blocked}: {self.not_applicable[blocked]}"))
        self._greedy()

    def _greedy(self) -> None:
        """From the fastest sound single option, add, round by round, the option that makes the current best
        variant fastest, while it gains MIN_GAIN. Every sound single option is a candidate, not only those that
        gained alone: an option may pay only with another (channels_last under bf16 autocast on a CPU: 1.00x
        alone, 2.6-3.6x with bf16 where bf16 alone is 1.2-1.9x), and one noisy measurement of it alone must not
        keep the pair from being tried."""
        singles = sorted((r for r in self.rows if sound(r) and len(r["options"]) == 1),
                         key=lambda r: -r["speedup"])
        if len(singles) < 2 or gain(singles[0]) < MIN_GAIN:
            return
        current = singles[0]
        candidates = [r["options"][0] for r in singles[1:]]
        while True:
            best = current
            for option in candidates:
                if not compatible(current["options"], option):
                    continue
                options = tuple(o for o in OPTIONS if o in (*current["options"], option))
                row = self._find(options)
                if row is None:
                    if self._over_budget(options):
                        self.rows.append(_row(options, "combination", status="skipped",
                                              reason=f"over the time budget of {self.budget:g} s"))
                        continue
                    row = self._measure(options, "combination")
                if sound(row) and row["speedup"] / best["speedup"] >= 1 + MIN_GAIN:
                    best = row
            if best is current:
                return
            current = best

    def _find(self, options) -> dict | None:
        return next((r for r in self.rows if tuple(r["options"]) == tuple(options)), None)

    def _over_budget(self, options) -> bool:
        """Whether measuring ``options`` would likely end past the budget: twice the baseline's time for the
        same steps, plus, for a compiled variant, the longest compile seen so far (COMPILE_GUESS_S before any),
        times MAX_AUTOTUNE_FACTOR for max-autotune (which benchmarks kernel choices while it compiles)."""
        if self.budget is None:
            return False
        baseline = self.rows[0]
        estimate = baseline["median_ms"] / 1e3 * (self.steps + self.warmup + self.check_steps) * 2
        if any(OPTIONS[o].compiles for o in options):
            compiled = [r["compile_s"] for r in self.rows if r.get("compile_s")]
            estimate += max(compiled, default=COMPILE_GUESS_S) * (MAX_AUTOTUNE_FACTOR if "max_autotune" in options
                                                                   else 1.0)
        return ranks.agree(time.perf_counter() - self.clock + estimate > self.budget, self.world)

    # -- one variant -------------------------------------------------------------------------------------------
    def _measure(self, options: tuple[str, ...], stage: str) -> dict:
        name = variant_name(options)
        row = _row(options, stage)
        if stage != "baseline" and self._over_budget(options):
            row.update(status="skipped", reason=f"over the time budget of {self.budget:g} s")
            self.rows.append(row)
            return row
        self.log(f"measuring {name}")
        prep = source = None
        try:
            with global_switches(options, self.device), compile_config(options):
                start = time.perf_counter()
                prep = prepare(options, self.template, self.optimizer_factory, self.device, loader=self.loader,
                               ddp=self.ddp)
                row["setup_s"] = time.perf_counter() - start
                no_op = _no_op(prep)
                if no_op is not None:  # the same step as without the option: never measured, never a winner
                    option, reason = no_op
                    self.not_applicable[option] = reason
                    row.update(status="not_applicable", reason=reason)
                    self.rows.append(row)
                    self.log(describe(row))
                    return row
                if stage == "baseline":  # the reference: IEEE float32 (TF32 off), whatever the process has
                    with global_switches((), self.device, ieee=True):
                        check = measure.check_run(prep, self.loss_fn, self.check_batches, self.seed)
                    self.reference = check
                    self.optimizer_name = type(prep.optimizer).__name__
                else:
                    check = measure.check_run(prep, self.loss_fn, self.check_batches, self.seed)
                    prec = precision(options, self.tf32)
                    row["check"] = measure.compare(self.reference, check, CHECK_BOUNDS[prec], prec)
                source = measure.batch_source(prep, getattr(self, "batch", None))
                times = measure.timed_steps(prep, self.loss_fn, source, self.steps, self.warmup,
                                            max_seconds=self._time_cap(stage))
            self._fill(row, times, check)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # recorded, and the run goes on
            row.update(status="failed", error=measure.one_line(exc))
        finally:
            if source is not None and hasattr(source, "close"):
                source.close()  # ends the iteration (persistent workers live on with the loader)
        row = ranks.gather_row(row, self.world)
        around = None
        # On the gathered row, so that every rank times the baseline block (its DDP collectives) or none does.
        if row["status"] == "ok" and stage != "baseline" and BASELINE in self.kept:
            around = self._baseline_around()
            if self.world > 1:  # the slowest rank's, as for the variant's own median
                around = max(ranks.all_gather(around, self.world))
        if row["status"] == "ok":  # on the gathered (slowest rank's) medians; the baseline's is 1
            row["baseline_ms"] = around if around is not None else (
                self.rows[0]["median_ms"] if self.rows else row["median_ms"])
            row["speedup"] = row["baseline_ms"] / row["median_ms"]
        self.rows.append(row)
        self._keep(row, prep)
        if prep is not None and all(prep is not kept for _, kept in self.kept.values()):
            _shut_down_workers(prep.loader)
        del prep, source
        if self.device.type == "cuda":  # free the variant's memory before the next one allocates
            gc.collect()
            torch.cuda.empty_cache()
        self.log(describe(row))
        return row

    def _baseline_around(self) -> float:
        """The baseline's step time around the variant just measured: the median of its block before the variant
        (the previous one, or its own measurement) and a block of BASELINE_BLOCK_STEPS steps timed now on its kept
        copy, under its own switches."""
        prep = self.kept[BASELINE][1]
        with global_switches(prep.options, self.device), compile_config(prep.options):
            source = measure.batch_source(prep, getattr(self, "batch", None))
            try:
                now = quantile(measure.timed_steps(prep, self.loss_fn, source, BASELINE_BLOCK_STEPS, 1).steps, 0.5)
            finally:
                if hasattr(source, "close"):
                    source.close()
        before, self.baseline_block_ms = self.baseline_block_ms, now
        return (before + now) / 2 if before is not None else now

    def _drop_kept(self) -> None:
        """Free the kept copies (and the worker processes of their loaders)."""
        for _, prep in self.kept.values():
            _shut_down_workers(prep.loader)
        self.kept.clear()
        gc.collect()

    def _keep(self, row: dict, prep) -> None:
        """Keep the baseline's copy and those of the CONFIRM_CONTENDERS fastest sound variants; drop the one a
        faster variant displaces. Decided on gathered rows, so every rank keeps the same."""
        if prep is None or not sound(row):
            return
        if row["stage"] == "baseline":
            self.kept[BASELINE] = (row, prep)
            self.baseline_block_ms = row["median_ms"]
            return
        self.kept[row["name"]] = (row, prep)
        others = sorted((name for name in self.kept if name != BASELINE),
                        key=lambda name: -self.kept[name][0]["speedup"])
        for name in others[CONFIRM_CONTENDERS:]:
            _shut_down_workers(self.kept.pop(name)[1].loader)

    def _fill(self, row: dict, times: measure.StepTimes, check: measure.CheckRun) -> None:
        median = times.median()
        phases = {name: times.median(values) for name, values in times.phases.items()}
        compile_s = None
        if any(OPTIONS[o].compiles for o in row["options"]):
            # The first forward + backward of the check compiles; with dropout (off in the check) the first
            # warm-up step compiles the training graph again. Each minus what a compiled step takes.
            compile_s = max(0.0, check.first_s - (phases["forward"] + phases["backward"]) / 1e3)
            if math.isfinite(times.first_warmup_s):
                compile_s += max(0.0, times.first_warmup_s - median / 1e3)
        row.update(status="ok", median_ms=median, p20_ms=quantile(times.steps, 0.2),
                   p80_ms=quantile(times.steps, 0.8), timed_steps=len(times.steps),
                   peak_memory=times.peak_memory, compile_s=compile_s, phases_ms=phases,
                   images_per_s=int(self.check_batches[0][0].shape[0]) * self.world / (median / 1e3))

    def _time_cap(self, stage: str) -> float | None:
        """Seconds after which a variant's timed steps stop (once MIN_TIMED_STEPS are done): a variant several
        times slower than the baseline is known to be slower long before ``steps`` steps."""
        if stage == "baseline" or not self.rows or not self.rows[0].get("median_ms") or self.world > 1:
            return None  # under DDP every rank must take the same number of steps
        return max(TIME_CAP_MIN_S, TIME_CAP_FACTOR * self.rows[0]["median_ms"] / 1e3 * self.steps)

    # -- the confirmation ---------------------------------------------------------------------------------------
    def _contenders(self) -> list[str]:
        """The kept variants that gained MIN_GAIN in the search and came within RUNOFF_FACTOR of the fastest,
        fastest first, as many as fit CONFIRM_MAX_S."""
        rows = sorted((row for name, (row, _) in self.kept.items() if name != BASELINE),
                      key=lambda row: -row["speedup"])
        if not rows or rows[0]["speedup"] < 1 + MIN_GAIN:
            return []
        rows = [row for row in rows
                if row["speedup"] >= 1 + MIN_GAIN and row["speedup"] * RUNOFF_FACTOR >= rows[0]["speedup"]]

        def rounds_s(rows) -> float:  # CONFIRM_ROUNDS rounds: each side's warm-up step and timed steps
            ms = self.kept[BASELINE][0]["median_ms"] + sum(row["median_ms"] for row in rows)
            return CONFIRM_ROUNDS * (CONFIRM_STEPS + 1) * ms / 1e3

        while len(rows) > 1 and rounds_s(rows) > CONFIRM_MAX_S:
            rows.pop()
        return [row["name"] for row in rows]

    def _confirm(self, record: dict) -> None:
        """Time the baseline and the contenders again, in turns (rounds of CONFIRM_STEPS steps each, the order
        rotating, for CONFIRM_MIN_S seconds and CONFIRM_ROUNDS rounds or more), on the copies kept from their
        measurement; the recommendation is then the contender with the highest median speed-up over the rounds,
        if its slow rounds still gain (see :func:`cnnperf.profiler.policy.recommend`). A machine whose load
        changed during the search (another job on a shared CPU, a GPU clocking down) shows up as a gain that does
        not hold; then the baseline is recommended and the summary says why."""
        if BASELINE not in self.kept:
            return
        names = self._contenders()
        if not names:
            return
        self.log(f"confirming {', '.join(names)} against {BASELINE}, in turns")
        order = [BASELINE, *names]
        rounds: list[dict[str, float]] = []  # per round: each side's median ms
        start = time.perf_counter()
        while True:
            i = len(rounds)
            medians = {}
            for name in order[i % len(order):] + order[:i % len(order)]:  # each goes first in turn
                prep = self.kept[name][1]
                with global_switches(prep.options, self.device), compile_config(prep.options):
                    source = measure.batch_source(prep, getattr(self, "batch", None))
                    try:
                        steps = measure.timed_steps(prep, self.loss_fn, source, CONFIRM_STEPS, 1).steps
                    finally:
                        if hasattr(source, "close"):
                            source.close()
                medians[name] = quantile(steps, 0.5)
            rounds.append(medians)
            more = len(rounds) < CONFIRM_MAX_ROUNDS and (
                len(rounds) < CONFIRM_ROUNDS or time.perf_counter() - start < CONFIRM_MIN_S)
            if not ranks.agree(more, self.world):  # every rank runs the same rounds
                break
        seconds = time.perf_counter() - start
        if self.world > 1:  # the slowest rank's times, round by round (every rank waits for it)
            gathered = ranks.all_gather((rounds, seconds), self.world)
            rounds = [{name: max(g[0][i][name] for g in gathered) for name in order} for i in range(len(rounds))]
            seconds = max(g[1] for g in gathered)
        confirmation = confirmation_of(rounds, CONFIRM_STEPS, {name: self.kept[name][0]["options"] for name in names})
        confirmation["seconds"] = seconds
        record["recommendation"] = recommend(self.rows, confirmation=confirmation)
        for c in confirmation["contenders"]:
            self.log(f"  {c['variant']}: {c['speedup']:.2f}x in turns (p20-p80 {c['speedup_p20']:.2f}-"
                     f"{c['speedup_p80']:.2f} over {len(rounds)} rounds)")

    # -- after the search: derived numbers, top ops, sweep --------------------------------------------------------
    def _after(self, record: dict) -> None:
        flops = None
        try:
            with global_switches((), self.device):
                prep = prepare((), self.template, self.optimizer_factory, self.device)
                flops = measure.count_flops(prep, self.loss_fn, self.check_batches[0])
            del prep
        except Exception as exc:
            flops = {"per_step": None, "forward": None, "method": f"failed: {measure.one_line(exc)}"}
        record["flops"] = flops
        _add_mfu(self.rows, record["run"], flops, record["peak_tflops"])
        for note in (busy(record["run"].get("load_average"), record["run"].get("cpu_count")),
                     drifting_allocator(record["run"].get("dynamic_mmap_threshold"), _malloc.ENVIRONMENT)):
            if note:
                record["recommendation"]["summary"] += " " + note
        chosen = parse_variant(record["recommendation"]["variant"])
        if self.want_top_ops or self.trace is not None:
            record["top_ops"] = self._top_ops(chosen, record)
        record["batch_sweep"] = batch_sweep(
            chosen, lambda: prepare(chosen, self.template, self.optimizer_factory, self.device, ddp=self.ddp),
            self.loss_fn, self.check_batches[0], self.device, batch_sizes=self.batch_sizes, steps=self.steps,
            warmup=self.warmup, world=self.world, budget=self.budget, clock=self.clock, log=self.log)

    def _top_ops(self, options, record: dict) -> dict | None:
        self.log(f"profiling the ops of {variant_name(options)}")
        trace = None
        if self.trace is not None and self.rank == 0:
            trace = self.trace
        try:
            with global_switches(options, self.device), compile_config(options):
                prep = prepare(options, self.template, self.optimizer_factory, self.device, loader=self.loader,
                               ddp=self.ddp)
                source = measure.batch_source(prep, getattr(self, "batch", None))
                try:
                    ops = measure.top_ops(prep, self.loss_fn, source, trace_path=trace)
                finally:
                    if hasattr(source, "close"):
                        source.close()
            if trace is not None:
                record["trace"] = str(trace)
            return ops
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            return {"variant": variant_name(options), "by": None, "ops": [], "error": measure.one_line(exc)}


def confirmation_of(rounds: Sequence[Mapping[str, float]], steps: int,
                    contenders: Mapping[str, Sequence[str]]) -> dict:
    """The confirmation record from the rounds in turns (per round, each side's median ms: the baseline's under
    BASELINE, each contender's under its name; ``contenders`` maps their names to their options). Per contender,
    the median of the rounds' baseline / contender ratios, with their p20 and p80, and its median time over the
    rounds. The winner, whose figures are the record's own, has the highest median; but a contender with a subset
    of its options within MIN_GAIN of it wins instead (an option that gains less than MIN_GAIN is not worth
    adding, as in the search)."""
    entries = []
    for name, options in contenders.items():
        ratios = [r[BASELINE] / r[name] for r in rounds]
        entries.append({"variant": name, "options": list(options), "speedup": quantile(ratios, 0.5),
                        "speedup_p20": quantile(ratios, 0.2), "speedup_p80": quantile(ratios, 0.8),
                        "variant_ms": quantile([r[name] for r in rounds], 0.5), "round_speedups": ratios})
    entries.sort(key=lambda e: -e["speedup"])
    winner = entries[0]
    for entry in entries[1:]:
        if set(entry["options"]) < set(winner["options"]) and entry["speedup"] * (1 + MIN_GAIN) > winner["speedup"]:
            winner = entry
    return {"variant": winner["variant"], "baseline_ms": quantile([r[BASELINE] for r in rounds], 0.5),
            "variant_ms": winner["variant_ms"], "speedup": winner["speedup"], "speedup_p20": winner["speedup_p20"],
            "speedup_p80": winner["speedup_p80"], "round_speedups": winner["round_speedups"],
            "rounds": len(rounds), "steps": steps,
            "contenders": [{k: v for k, v in e.items() if k != "options"} for e in entries]}


def _no_op(prep) -> tuple[str, str] | None:
    """(option, why) when an option of ``prep`` changed nothing in its model: ``fuse`` that fused no layer."""
    if "fuse" in prep.options:
        from cnnperf.fusion import REPORT_ATTRIBUTE

        report = getattr(prep.module, REPORT_ATTRIBUTE, None)
        if report is not None and not report.fused:
            return "fuse", ("fuse() found no Conv2d followed by a ReLU (or by a BatchNorm2d and a ReLU) to fuse in "
                            "this model (0 layers): the step would be the same")
    return None


def _on_device(device: torch.device):
    """``torch.cuda.device(device)`` for a CUDA device (events, streams and allocations go there), else nothing."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _shut_down_workers(loader) -> None:
    """End the worker processes a loader with persistent workers keeps between epochs (they would otherwise
    live until the loader is garbage-collected)."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
        loader._iterator = None


def _load_average() -> float | None:
    """The 1-minute load average of the machine (None where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _row(options: Sequence[str], stage: str, **fields) -> dict:
    row = {"name": variant_name(options), "options": list(options), "stage": stage, "status": "ok", "error": None,
           "reason": None, "median_ms": None, "p20_ms": None, "p80_ms": None, "timed_steps": None,
           "images_per_s": None, "speedup": None, "peak_memory": None, "compile_s": None, "setup_s": None,
           "phases_ms": None, "mfu": None, "check": None, "ranks": None}
    row.update(fields)
    return row


def _add_mfu(rows: list[dict], run: dict, flops: dict | None, peaks: dict | None) -> None:
    """The MFU of every measured row: FLOPs per step / median step time / the peak of its number format."""
    per_step = (flops or {}).get("per_step")
    if not per_step or not peaks:
        return
    for row in rows:
        peak = peaks.get(precision(row["options"], run.get("tf32", False)))
        if row["status"] == "ok" and peak:
            row["mfu"] = per_step / (row["median_ms"] / 1e3) / (peak * 1e12)
