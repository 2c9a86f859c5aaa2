"""Measuring one variant: its numerical check (:func:`check_run`, :func:`compare`), its timed training steps
split into the phases data, forward (the loss included), backward and optimizer (:func:`timed_steps`: each phase
an NVTX range, and in the profiled pass a torch.profiler range; on a GPU, CUDA events at the phase boundaries with
no synchronisation inside the timed steps, so that a step is the time between its first and last event, idle gaps
included; on the CPU, ``time.perf_counter``), FLOPs, the device's peak TFLOP/s and the top ops. The step itself is
:mod:`cnnperf.profiler.step`'s. Imports torch, :mod:`cnnperf._timing` and the profiler's step and variants.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from cnnperf._timing import quantile, synchronize
from cnnperf.profiler.step import BatchError, backward, forward_loss, optimizer_step, split_batch, to_device
from cnnperf.profiler.variants import CheckBound, Prepared

PHASES = ("data", "forward", "backward", "optimizer")
MAX_SCALER_RETRIES = 24  # fp16 check: halvings of the GradScaler's scale (2^16 at the start) before giving up


@functools.cache
def nvtx_range() -> Callable[[str], contextlib.AbstractContextManager] | None:
    """How a phase becomes an NVTX range: the ``nvtx`` package (domain "cnnperf") when it is installed, else
    ``torch.cuda.nvtx`` (the default domain, the same names; Nsight Systems shows both) where CUDA is, else
    nothing (a CPU-only machine without the package: no tool could read the ranges)."""
    try:
        import nvtx
    except ImportError:
        return torch.cuda.nvtx.range if torch.cuda.is_available() else None
    return functools.partial(nvtx.annotate, domain="cnnperf")


@contextlib.contextmanager
def phase(name: str, profiled: bool = False):
    """An NVTX range named ``cnnperf/<name>`` (seen by Nsight Systems; see :func:`nvtx_range`), and with
    ``profiled`` a torch.profiler range of the same name. record_function costs ~16 us even with no profiler
    running (4 phases: ~65 us a step, enough to widen a launch-bound GPU step), so only the top-ops pass,
    under torch.profiler, asks."""
    annotate = nvtx_range()
    with annotate(f"cnnperf/{name}") if annotate is not None else contextlib.nullcontext():
        if not profiled:
            yield
            return
        with torch.profiler.record_function(f"cnnperf/{name}"):
            yield


# ---------------------------------------------------------------------------------------------------------
# Numerical check.
# ---------------------------------------------------------------------------------------------------------

@dataclass
class CheckRun:
    """Losses and gradients of a variant on the check batches, from its initial weights (no optimizer step).

    ``grads[i]`` maps parameter names (of the model before compile/DDP) to float32 gradients of batch i.
    ``first_s``: wall time of the first forward + backward (with compilation, for compiled variants).
    """

    losses: list[float]
    grads: list[dict[str, torch.Tensor]]
    first_s: float
    notes: list[str]


def check_run(prep: Prepared, loss_fn: Callable, batches: Sequence, seed: int) -> CheckRun:
    """Forward and backward of ``prep`` on each of ``batches``, seeding torch before each one with ``seed + i``.
    Dropout modules are switched off for the check (and back on after): reseeding gives the same random numbers,
    but a channels_last activation puts them on other elements, so the masks of two variants would differ.
    fp16 with a GradScaler: a batch whose scaled gradients overflow is redone at half the scale, as the
    GradScaler would over its first steps."""
    dropouts = [m for m in prep.module.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.training]
    for m in dropouts:
        m.eval()
    try:
        return _check_run(prep, loss_fn, batches, seed)
    finally:
        for m in dropouts:
            m.train()


def _check_run(prep: Prepared, loss_fn: Callable, batches: Sequence, seed: int) -> CheckRun:
    losses, grads, notes, first_s = [], [], [], math.nan
    for i, (x, y) in enumerate(batches):
        for attempt in range(MAX_SCALER_RETRIES + 1):
            prep.optimizer.zero_grad(set_to_none=True)
            _seed(prep.device, seed + i)
            synchronize(prep.device)
            start = time.perf_counter()
            loss = forward_loss(prep, loss_fn, x, y)
            backward(prep, loss)
            synchronize(prep.device)
            if i == 0 and attempt == 0:
                first_s = time.perf_counter() - start
            if prep.scaler is None:
                break
            prep.scaler.unscale_(prep.optimizer)
            overflow = not all(bool(torch.isfinite(p.grad).all()) for p in prep.module.parameters()
                               if p.grad is not None)
            prep.scaler.update()  # halves the scale after an overflow, as after a skipped step
            if not overflow:
                break
            if attempt == MAX_SCALER_RETRIES or prep.scaler.get_scale() < 1:
                notes.append(f"check batch {i}: gradients not finite at every scale down to "
                             f"{prep.scaler.get_scale():g} (not an overflow of the scaling: NaN or inf in fp16)")
                break
        losses.append(float(loss.detach().float()))
        # On the host: the reference's gradients live through the whole run, and device memory is the
        # variants' (and the batch-size sweep's).
        grads.append({name: p.grad.detach().float().cpu() for name, p in prep.module.named_parameters()
                      if p.grad is not None})
    prep.optimizer.zero_grad(set_to_none=True)
    return CheckRun(losses, grads, first_s, notes)


def _seed(device: torch.device, seed: int) -> None:
    """Seed the generator that random ops on ``device`` draw from (and the CPU's), and no other: torch.manual_seed
    would also queue a seed for every CUDA device, changing the random state of a GPU this run never used."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.default_generators[device.index if device.index is not None else 0].manual_seed(seed)


def compare(ref: CheckRun, got: CheckRun, bound: CheckBound, precision: str) -> dict:
    """The check record (SCHEMA.md) of ``got`` against the float32 baseline ``ref``.

    The gradient error of a step is relative over all parameters together, ``||g - r|| / ||r||`` with every
    gradient flattened into one vector (float64). Per parameter it would be noise: the gradients of BatchNorm
    shifts and scales are sums that cancel almost to zero, so that even float32 in another memory format moves
    them by percents of their own small norm (3e-2 on ResNet-50's). ``worst_param`` names the parameter with
    the largest share of the error.
    """
    loss_err = 0.0
    for a, r in zip(got.losses, ref.losses):
        err = abs(a - r) / max(abs(r), 1e-6)
        loss_err = max(loss_err, err if math.isfinite(err) else math.inf)
    grad_err, worst = 0.0, None
    for step_got, step_ref in zip(got.grads, ref.grads):
        pairs = _pair_parameters(step_ref, step_got)
        if pairs is None:
            grad_err, worst = math.inf, "(the variant's parameters do not match the model's)"
            break
        diff2 = {name: (g.double() - r.double()).square().sum().item() for name, r, g in pairs}
        ref2 = sum(r.double().square().sum().item() for _, r, _ in pairs)
        err = math.sqrt(sum(diff2.values())) / max(math.sqrt(ref2), 1e-30)
        err = err if math.isfinite(err) else math.inf
        if worst is None or err > grad_err:
            grad_err = err
            worst = max(diff2, key=lambda n: diff2[n] if math.isfinite(diff2[n]) else math.inf) if diff2 else None
    passed = loss_err <= bound.loss and grad_err <= bound.grad and not got.notes
    return {"passed": bool(passed), "loss_err": loss_err, "grad_err": grad_err, "loss_tol": bound.loss,
            "grad_tol": bound.grad, "worst_param": worst, "steps": len(got.losses), "precision": precision}


def _pair_parameters(ref: dict, got: dict):
    """(name, reference gradient, variant gradient) for every parameter: matched by name, or, when a transform
    renamed them, by position with equal shapes; None when neither matches."""
    if ref.keys() == got.keys():
        return [(name, ref[name], got[name]) for name in ref]
    if len(ref) == len(got) and all(r.shape == g.shape for r, g in zip(ref.values(), got.values())):
        return [(name, r, g) for (name, r), g in zip(ref.items(), got.values())]
    return None


# ---------------------------------------------------------------------------------------------------------
# Timed steps.
# ---------------------------------------------------------------------------------------------------------

@dataclass
class StepTimes:
    """Per-step times in milliseconds over the timed steps: ``steps`` whole steps, ``phases[name]`` each phase."""

    steps: list[float]
    phases: dict[str, list[float]]
    peak_memory: int | None
    first_warmup_s: float = math.nan  # wall time of the first warm-up step (compiles again after the check)

    def median(self, values: Sequence[float] | None = None) -> float:
        return quantile(self.steps if values is None else values, 0.5)


def _bytes_held(prep: Prepared) -> int:
    """Device bytes of the variant's own tensors between steps: parameters, their gradients, buffers, optimizer
    state."""
    tensors = {}
    for t in itertools.chain(prep.module.parameters(), prep.module.buffers()):
        tensors[id(t)] = t
        if t.grad is not None:
            tensors[id(t.grad)] = t.grad
    for state in prep.optimizer.state.values():
        for t in state.values():
            if isinstance(t, torch.Tensor):
                tensors[id(t)] = t
    return sum(t.numel() * t.element_size() for t in tensors.values() if t.device == prep.device)


def batch_source(prep: Prepared, batch=None) -> Iterator:
    """The batches of the timed steps: ``batch`` again and again, or the variant's loader cycled, leaving out
    batches of another size than the first (a short last batch would recompile a compiled model and time a
    different amount of work)."""
    if prep.loader is None:
        return itertools.repeat(batch)
    return _full_batches(prep.loader)


def _full_batches(loader) -> Iterator:
    size = None
    while True:
        empty = True
        for batch in loader:
            empty = False
            x, _ = split_batch(batch, "a batch of the loader")
            if size is None:
                size = x.shape[0]
            if x.shape[0] == size:
                yield batch
        if empty:
            raise BatchError("the DataLoader yielded no batch")


MIN_TIMED_STEPS = 5


def plain_steps_s(prep: Prepared, loss_fn: Callable, x, y, steps: int) -> float:
    """Seconds per step of ``steps`` plain training steps of ``prep`` on one batch: no marks, no ranges,
    synchronised at the ends only (what a user's loop costs; the benchmarks' reference for :func:`timed_steps`
    and their A/Bs). The caller sets the variant's switches if it needs them."""
    synchronize(prep.device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = forward_loss(prep, loss_fn, x, y)
        backward(prep, loss)
        optimizer_step(prep)
    synchronize(prep.device)
    return (time.perf_counter() - start) / steps


def timed_steps(prep: Prepared, loss_fn: Callable, source: Iterator, steps: int, warmup: int,
                max_seconds: float | None = None, profiled: bool = False) -> StepTimes:
    """``warmup`` untimed training steps, then ``steps`` timed ones; per-step and per-phase times. With
    ``max_seconds``, the timed steps stop once they have taken that long and MIN_TIMED_STEPS are done;
    ``profiled``: the phases are torch.profiler ranges too (see :func:`phase`)."""
    device = prep.device
    cuda = device.type == "cuda"

    def one_step(marks: list | None) -> None:
        def mark():
            if marks is not None:
                if cuda:
                    event = torch.cuda.Event(enable_timing=True)
                    event.record()
                    marks.append(event)
                else:
                    marks.append(time.perf_counter())

        mark()
        with phase("data", profiled):
            x, y = split_batch(next(source), "a batch")
            x, y = to_device(x, device), to_device(y, device)
        mark()
        with phase("forward", profiled):
            loss = forward_loss(prep, loss_fn, x, y)
        mark()
        with phase("backward", profiled):
            backward(prep, loss)
        mark()
        with phase("optimizer", profiled):
            optimizer_step(prep)
        mark()

    first_warmup_s = math.nan
    for i in range(warmup):
        start = time.perf_counter()
        one_step(None)
        if i == 0:
            synchronize(device)
            first_warmup_s = time.perf_counter() - start
    synchronize(device)
    others = 0
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        # Memory the variant does not own (the user's model, the kept copies, the template): left out of its peak.
        others = torch.cuda.memory_allocated(device) - _bytes_held(prep)
    marks: list[list] = []
    start = time.perf_counter()
    for i in range(steps):
        marks.append([])
        one_step(marks[-1])
        if (max_seconds is not None and i + 1 >= MIN_TIMED_STEPS
                and time.perf_counter() - start > max_seconds):
            break
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - others if cuda else None
    if cuda:
        durations = [[a.elapsed_time(b) for a, b in zip(m, m[1:])] for m in marks]
    else:
        durations = [[(b - a) * 1e3 for a, b in zip(m, m[1:])] for m in marks]
    phases = {name: [d[i] for d in durations] for i, name in enumerate(PHASES)}
    return StepTimes([sum(d) for d in durations], phases, peak, first_warmup_s)


# ---------------------------------------------------------------------------------------------------------
# FLOPs, peaks, top ops.
# ---------------------------------------------------------------------------------------------------------

def count_flops(prep: Prepared, loss_fn: Callable, batch) -> dict:
    """Forward and forward + backward FLOPs of one step of ``prep`` on ``batch`` (torch.utils.flop_counter:
    matmuls and convolutions, the work that peak throughput is quoted for)."""
    from torch.utils.flop_counter import FlopCounterMode

    x, y = split_batch(batch)
    counter = FlopCounterMode(display=False)
    with counter:
        loss = forward_loss(prep, loss_fn, x, y)
    forward = counter.get_total_flops()
    with counter:
        loss.backward()
    prep.optimizer.zero_grad(set_to_none=True)
    return {"forward": float(forward), "per_step": float(forward + counter.get_total_flops()),
            "method": "torch.utils.flop_counter.FlopCounterMode (matmuls and convolutions, forward + backward)"}


# Dense (no sparsity) peak TFLOP/s by number format, from NVIDIA's data sheets (half the sparse figures they
# quote); matched on the device name as torch reports it ("NVIDIA H200", "NVIDIA H100 80GB HBM3",
# "NVIDIA A100-SXM4-80GB"), the more specific entries first: "GH200" and "H200 NVL" before "H200".
# float32 is the CUDA-core rate; tf32/bfloat16/float16 the tensor cores'. The H200 (SXM) computes at the H100
# SXM's rates (its memory is larger and faster, 4.8 TB/s against 3.35).
PEAK_TFLOPS = (
    ("H100 PCIe", {"float32": 51.2, "tf32": 378.0, "bfloat16": 756.0, "float16": 756.0}),
    ("H100 NVL", {"float32": 60.0, "tf32": 417.5, "bfloat16": 835.0, "float16": 835.0}),
    ("H100", {"float32": 67.0, "tf32": 494.7, "bfloat16": 989.4, "float16": 989.4}),
    ("H200 NVL", {"float32": 60.0, "tf32": 417.5, "bfloat16": 835.5, "float16": 835.5}),
    ("GH200", {"float32": 67.0, "tf32": 494.7, "bfloat16": 989.4, "float16": 989.4}),
    ("H200", {"float32": 67.0, "tf32": 494.7, "bfloat16": 989.4, "float16": 989.4}),
    ("A100", {"float32": 19.5, "tf32": 156.0, "bfloat16": 312.0, "float16": 312.0}),
    ("L40S", {"float32": 91.6, "tf32": 183.0, "bfloat16": 362.05, "float16": 362.05}),
    ("L4", {"float32": 30.3, "tf32": 60.0, "bfloat16": 121.0, "float16": 121.0}),
    ("A10", {"float32": 31.2, "tf32": 62.5, "bfloat16": 125.0, "float16": 125.0}),
)


def peak_tflops(device_name: str) -> dict | None:
    """The device's dense peak TFLOP/s per number format, or None where not known (CPUs, other GPUs)."""
    for key, peaks in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return {**peaks, "source": f"NVIDIA data sheet, {key}, dense"}
    return None


def top_ops(prep: Prepared, loss_fn: Callable, source: Iterator, steps: int = 3, limit: int = 15,
            trace_path=None) -> dict:
    """The ops (and on a GPU the kernels) with the most self time over ``steps`` profiled steps after one
    warm-up step, per step; optionally the Chrome/Perfetto trace of those steps at ``trace_path``."""
    from torch.profiler import ProfilerActivity, profile

    cuda = prep.device.type == "cuda"
    timed_steps(prep, loss_fn, source, 1, 0)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with _native_stderr_silenced(), profile(activities=activities) as prof:
        timed_steps(prep, loss_fn, source, steps, 0, profiled=True)
    if trace_path is not None:
        import os

        os.makedirs(os.path.dirname(os.path.abspath(trace_path)), exist_ok=True)
        prof.export_chrome_trace(str(trace_path))
        if not os.path.exists(trace_path):  # Kineto reports a failed write on stderr only
            raise OSError(f"torch.profiler could not write the trace to {trace_path}")
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if not e.key.startswith(("cnnperf/", "ProfilerStep"))]
    total = sum(getattr(e, key) for e in events) or 1.0
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    ops = [{"name": e.key, "self_ms": getattr(e, key) / 1e3 / steps, "calls": e.count // steps,
            "percent": 100.0 * getattr(e, key) / total} for e in events[:limit] if getattr(e, key) > 0]
    return {"variant": prep.name, "by": "self_device_time" if cuda else "self_cpu_time", "ops": ops}


@contextlib.contextmanager
def _native_stderr_silenced():
    """File descriptor 2 pointed at /dev/null: Kineto writes "profiler_start/stop" lines (and, on a CUDA build
    without a GPU, an "ERROR ... gpuGetDeviceCount" line) straight to it from C++, which would read as a failure
    in the middle of the report. Python exceptions still propagate; Python's own sys.stderr is untouched."""
    import os
    import sys

    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real descriptor 2 (an embedded interpreter): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory error (CUDA's, or the CPU allocator's)."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message``, at most ``limit`` characters."""
    text = str(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    return line if len(line) <= limit else line[:limit - 3] + "..."
