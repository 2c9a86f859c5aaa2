"""``cnnperf bench-clip``: time the fused gradient norm + clip against torch's ``clip_grad_norm_``.

What is measured, per case and dtype:

- cases: the parameters of torchvision's ResNet-50 (161 tensors, 25.6M elements) and VGG-16 (32 tensors,
  138.4M elements), read from the models built on the ``meta`` device, and ``tiny``: 1,000 one-dimensional
  tensors whose sizes cycle 1, 2, ..., 64 elements (32,020 elements in all; a launch-bound case);
- variants: ``torch`` (``torch.nn.utils.clip_grad_norm_(..., foreach=True)``), ``loop`` (the naive way: one
  ``norm()`` per gradient, their norm, one ``mul_`` per gradient) and ``cnnperf`` (:func:`cnnperf.clip_grad_norm_`);
  and with an optimizer step: ``adamw`` (one step of ``torch.optim.AdamW(fused=True)`` alone, no clip),
  ``torch+adamw`` (torch's clip, then the step) and ``cnnperf_in_adamw`` (``cnnperf.clip_grad_norm_(...,
  optimizer=opt)``, the clip applied by the step). Their rows carry ``step_time_over_adamw``, the time over the
  step's alone (the cost of clipping on top of the step), instead of the bandwidth and the speed-up over torch;
  the optimizer is made on the first call and kept (its state grows once; the parameters drift, which changes no
  timing);
- dtypes: float32 (default), bfloat16, float16, and ``mixed`` (tensors alternate bfloat16 / float32, in
  parameter order).

Gradients are random normal (never zeros) and ``max_norm`` is half their total norm, so every call clips
(coefficient about 0.5). A clip scales the gradients in place, so the gradients are restored from a saved copy
before every timed call, outside the timed region. Clipping the same gradients again does not keep clipping:
the first call leaves the norm at ``max_norm * t / (t + 1e-6)`` (``t`` the old norm), the second at about
``max_norm - 1e-6``, and that is the fixed point, where ``max_norm / (norm + 1e-6)`` is 1. In fp32 with
``max_norm = 1`` the coefficient rounds to exactly 1.0 from the third call on, and from then on cnnperf's scale
kernel skips its writes while torch still multiplies by 1 (in bf16 the coefficient already rounds to 1 in the
gradients' dtype on the second call: nothing changes any more). Either way a timed loop would time a clip that
clips nothing. tests/test_benchmark_clip.py checks the fp32 case, and that every timed call starts from the saved
gradients.

Each row carries the device, dtype, case, tensor and element counts, gradient bytes, timing quantiles, the
achieved bandwidth counting 3x the gradient bytes (one read for the norm, a read and a write for the scale)
and its fraction of the device's copy bandwidth (measured once per run), the kernel launches per call (CUDA:
kernels seen by torch.profiler over one call), whether one call ran without a host synchronisation (CUDA:
``torch.cuda.set_sync_debug_mode("error")``), the speed-up over ``torch``, the numerical check and the
versions. The run is one JSON record, rewritten atomically after every case.

``host_us`` (cnnperf rows): the host time of one call of cnnperf's Triton path with every kernel launch made a
no-op and that path forced on any device, median of rounds of calls: the Python side of a call (argument
checks, the per-call plan, allocations), without Triton's launcher and without the GPU's work; measurable on a
machine without a GPU. Gradients are the same tensors call after call (the in-place restore).

Timing: on CUDA CUDA events around each call with L2 flushed before it, as ``triton.testing.do_bench``
does (which has no per-call set-up hook for the restore; the time includes host overhead that the GPU work
does not hide, as do_bench's does). On the CPU a host clock, via :func:`cnnperf._timing.time_host`. On the CPU
without ``TRITON_INTERPRET`` the cnnperf variant is the reference path: those numbers only show that the
harness works; the numbers that matter come from a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from cnnperf import _cli, _terminal, backend, testing
from cnnperf._env import device_name, versions
from cnnperf._format import fmt, sig
from cnnperf._timing import Timing, geomean, time_cuda, time_cuda_with_reset, time_host
from cnnperf.benchmarks import harness
from cnnperf.conv_shapes import meta_model
from cnnperf.ops.grad_norm import clip_grad_norm_

CASES = ("resnet50", "vgg16", "tiny")
QUICK_CASES = ("resnet50", "tiny")  # --quick leaves VGG-16 out: 138M fp32 gradients are 553 MB per copy
CLIP_VARIANTS = ("torch", "loop", "cnnperf")
STEP_VARIANTS = ("adamw", "torch+adamw", "cnnperf_in_adamw")
VARIANTS = CLIP_VARIANTS + STEP_VARIANTS
DTYPES = {  # name -> the dtypes the tensors cycle through, in parameter order
    "float32": (torch.float32,),
    "bfloat16": (torch.bfloat16,),
    "float16": (torch.float16,),
    "mixed": (torch.bfloat16, torch.float32),
}

TINY_TENSORS, TINY_MAX_ELEMENTS = 1000, 64
CLIP_FRACTION = 0.5  # max_norm = this x the gradients' total norm: every call clips, coefficient ~0.5
BYTES_PER_GRAD_BYTE = 3  # the norm reads every gradient once, the scale reads and writes it
# The copy that measures the device's bandwidth: 1 GiB of fp32 on a GPU, 128 MiB (beyond any cache) on a CPU.
COPY_ELEMENTS = {"cuda": 1 << 28, "cpu": 1 << 25}
CUDA_REP_MS, CUDA_QUICK_REP_MS = 100.0, 25.0
HOST_BUDGET_S, HOST_QUICK_BUDGET_S = 1.0, 0.1

SCHEMA = "cnnperf.bench_clip/1"
MEASURES = ("gbps", "pct_copy_bw")  # the row fields besides the timing that a failed variant has none of


# ---------------------------------------------------------------------------------------------------------
# Cases: the parameter shapes, then parameters with random gradients.
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """The gradients of one benchmark case: their shapes, in parameter order."""

    name: str
    shapes: tuple[tuple[int, ...], ...]

    @property
    def tensors(self) -> int:
        return len(self.shapes)

    @property
    def elements(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def dtypes(self, dtype: str) -> list[torch.dtype]:
        """The dtype of each gradient under the ``--dtype`` name ``dtype``."""
        cycle = DTYPES[dtype]
        return [cycle[i % len(cycle)] for i in range(self.tensors)]

    def grad_bytes(self, dtype: str) -> int:
        """Bytes of all gradients in ``dtype``; one clip moves BYTES_PER_GRAD_BYTE times this."""
        return sum(math.prod(s) * d.itemsize for s, d in zip(self.shapes, self.dtypes(dtype)))


@functools.cache
def make_case(name: str) -> Case:
    """The case ``name``: a torchvision model's parameter shapes, or ``tiny`` (sizes cycling 1..64)."""
    if name == "tiny":
        return Case(name, tuple((i % TINY_MAX_ELEMENTS + 1,) for i in range(TINY_TENSORS)))
    if name in ("resnet50", "vgg16"):
        return Case(name, tuple(tuple(p.shape) for p in meta_model(name).parameters()))
    raise ValueError(f"unknown case {name!r}; choose from {', '.join(CASES)}")


CASE_NOTES = {
    "resnet50": "torchvision resnet50 parameters (161 tensors, 25.6M elements)",
    "vgg16": "torchvision vgg16 parameters (32 tensors, 138.4M elements)",
    "tiny": f"{TINY_TENSORS} 1-D tensors, sizes cycling 1..{TINY_MAX_ELEMENTS} elements",
}


@dataclass
class Grads:
    """Parameters with random gradients, a copy to restore them from, and the ``max_norm`` that clips them."""

    params: list[torch.nn.Parameter]
    saved: list[torch.Tensor]
    total_norm: float  # of the saved gradients, in float64
    max_norm: float

    @property
    def grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self.params]

    @property
    def clip_coef(self) -> float:
        """The coefficient of every timed call (they all start from the saved gradients)."""
        return min(1.0, self.max_norm / (self.total_norm + 1e-6))

    def restore(self) -> None:
        """Copy the saved gradients back, in place (same storage: cnnperf's cached device table stays valid)."""
        torch._foreach_copy_(self.grads, self.saved)


def make_grads(case: Case, dtype: str, device: torch.device, seed: int = 0) -> Grads:
    """Parameters of ``case`` on ``device`` with random normal gradients in ``dtype`` (a DTYPES name).

    The parameters start at zero (only the step variants read them; uninitialised memory could hold NaN or
    denormals, which some CPUs compute slowly).
    """
    gen = torch.Generator(device).manual_seed(seed)
    params = []
    for shape, dt in zip(case.shapes, case.dtypes(dtype)):
        p = torch.nn.Parameter(torch.zeros(shape, device=device, dtype=dt))
        # Drawn in float32, then rounded: torch 2.11's bfloat16 randn on the CPU makes 0.6% exact zeros (2.14: none).
        p.grad = torch.randn(shape, generator=gen, device=device).to(dt)
        params.append(p)
    saved = [p.grad.clone() for p in params]
    norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64) for g in saved])
    total = torch.linalg.vector_norm(norms).item()
    return Grads(params, saved, total, CLIP_FRACTION * total)


# ---------------------------------------------------------------------------------------------------------
# Variants: fn(params, max_norm) -> total norm, clipping the gradients in place.
# ---------------------------------------------------------------------------------------------------------

def clip_torch(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """torch's own clip with its multi-tensor (foreach) kernels: the baseline."""
    return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)


def clip_loop(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """The naive clip: one norm per gradient, the norm of those, then one multiply per gradient."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.stack([g.norm() for g in grads]).norm()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef)
    return total


def make_variant(variant: str, backend_name: str | None = None) -> Callable[[list, float], torch.Tensor | None]:
    """``fn(params, max_norm)`` clipping the gradients of ``params`` the way ``variant`` does (and stepping, for
    :data:`STEP_VARIANTS`), returning the total norm (None for ``adamw``, which does not clip)."""
    if variant == "torch":
        return clip_torch
    if variant == "loop":
        return clip_loop
    if variant == "cnnperf":
        return harness.cnnperf_backend_fn(clip_grad_norm_, backend_name)
    if variant in STEP_VARIANTS:
        return _with_adamw_step(variant, harness.cnnperf_backend_fn(clip_grad_norm_, backend_name))
    raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")


def _with_adamw_step(variant: str, cnnperf_clip: Callable) -> Callable[[list, float], torch.Tensor | None]:
    optimizers: dict[int, torch.optim.Optimizer] = {}

    def step(params: list[torch.Tensor], max_norm: float) -> torch.Tensor | None:
        opt = optimizers.get(id(params))
        if opt is None:
            opt = optimizers[id(params)] = torch.optim.AdamW(params, lr=1e-3, fused=True)
        total = None
        if variant == "torch+adamw":
            total = clip_torch(params, max_norm)
        elif variant == "cnnperf_in_adamw":
            total = cnnperf_clip(params, max_norm, optimizer=opt)
        opt.step()
        return total
    return step


def cnnperf_path(backend_name: str, device: torch.device) -> str:
    """Which implementation the cnnperf variant runs here: 'triton' or 'reference'."""
    if backend_name == "reference" or not backend.device_runs_triton(device.type):
        return "reference"
    return "triton"


# ---------------------------------------------------------------------------------------------------------
# Numerical check against torch and float64 (the tolerance table of cnnperf.testing).
# ---------------------------------------------------------------------------------------------------------

def check_variant(fn: Callable, grads: Grads, strict: bool = True) -> dict:
    """Clip the saved gradients with ``fn`` and with torch (foreach) and compare; the gradients are restored.

    Always: the total norm against torch's and against float64, each clipped gradient against torch's, all
    within the tolerance of the lowest-precision dtype present (torch rounds per-tensor norms to each
    gradient's dtype, so with mixed dtypes its coefficient carries bf16 rounding). ``strict``: each clipped
    gradient also against float64 (saved gradient x the float64 coefficient) within its own dtype's tolerance.
    Returns ``{"check": "ok" | "FAIL <what>", "check_err": worst error as a multiple of its tolerance}``.
    """
    grads.restore()
    expected_total = clip_torch(grads.params, grads.max_norm)
    expected = [g.clone() for g in grads.grads]
    grads.restore()
    total = fn(grads.params, grads.max_norm)
    actual = grads.grads
    low = max({g.dtype for g in actual}, key=lambda d: torch.finfo(d).eps)
    total64 = torch.tensor(grads.total_norm, dtype=torch.float64, device=total.device)
    coef64 = grads.max_norm / (grads.total_norm + 1e-6)

    # (what, actual, reference (a function: float64 references are made one at a time), tolerance dtype)
    pairs = [("total norm vs torch", total, lambda: expected_total, low),
             ("total norm vs float64", total, lambda: total64, low)]
    pairs += [(f"gradient {i} {tuple(g.shape)} vs torch", g, lambda e=e: e, low)
              for i, (g, e) in enumerate(zip(actual, expected))]
    if strict:
        pairs += [(f"gradient {i} {tuple(g.shape)} vs float64", g, lambda s=s: s.double() * coef64, g.dtype)
                  for i, (g, s) in enumerate(zip(actual, grads.saved))]
    failure = None
    try:
        errors = torch.stack([_error(a, ref(), dtype) for _, a, ref, dtype in pairs]).cpu()  # one sync
        errors = errors.nan_to_num(nan=math.inf)  # a NaN anywhere fails
        worst = errors.max().item()
        if worst > 1:
            name, a, ref, dtype = pairs[int(errors.argmax())]
            try:
                testing.assert_close(a, ref(), dtype, name=name)
                failure = f"FAIL {name}: error {worst:.3g} x tolerance"
            except AssertionError as e:
                failure = f"FAIL {str(e).splitlines()[0]}"
    finally:
        grads.restore()
    return {"check": failure or "ok", "check_err": sig(worst) if worst < math.inf else None}


def _error(actual: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """max |actual - ref| / (atol * max(1, max|ref|) + rtol * |ref|): above 1 fails testing.assert_close."""
    tol = testing.tolerance(dtype)
    ref = ref.detach().to(torch.float64)
    scale = ref.abs().max().clamp(min=1.0)
    return ((actual.detach().to(torch.float64) - ref).abs() / (tol.atol * scale + tol.rtol * ref.abs())).max()


# ---------------------------------------------------------------------------------------------------------
# Timing, copy bandwidth, kernel launches, host synchronisation.
# ---------------------------------------------------------------------------------------------------------

def time_clip(call: Callable[[], None], grads: Grads, device: torch.device, quick: bool,
              repeat: int | None) -> Timing:
    """Quantiles of ``call`` with the gradients restored before every call, outside the timed region."""
    if device.type == "cuda":
        return time_cuda_with_reset(call, grads.restore, CUDA_QUICK_REP_MS if quick else CUDA_REP_MS, repeat)
    budget_s = HOST_QUICK_BUDGET_S if quick else HOST_BUDGET_S
    return time_host(call, device, reset=grads.restore, budget_s=budget_s, min_reps=repeat or 5,
                           max_reps=repeat or 100)


def measure_copy_bandwidth(device: torch.device) -> dict:
    """The device's copy bandwidth, bytes read + written per second: the denominator of "% of copy".

    CUDA: the median of a 1 GiB device-to-device ``Tensor.copy_`` with do_bench. CPU: the fastest of repeated
    128 MiB ``Tensor.copy_`` in host memory with the threads torch uses (the fastest: on a shared CPU the
    median includes time the process was descheduled).
    """
    n = COPY_ELEMENTS["cuda" if device.type == "cuda" else "cpu"]
    src = torch.randn(n, generator=torch.Generator(device).manual_seed(1), device=device)
    dst = torch.empty_like(src)
    call = functools.partial(dst.copy_, src)
    nbytes = n * src.element_size()
    if device.type == "cuda":
        ms, statistic, timer = time_cuda(call).median_ms, "median", "triton.testing.do_bench"
        what = f"device-to-device copy (Tensor.copy_, {nbytes >> 20} MiB fp32)"
    else:
        ms, statistic, timer = time_host(call, device, budget_s=0.5).min_ms, "min", "time.perf_counter"
        what = f"host-memory copy (Tensor.copy_, {nbytes >> 20} MiB fp32, {torch.get_num_threads()} threads)"
    return {"gbps": sig(2 * nbytes / (ms * 1e-3) / 1e9), "what": what, "bytes_per_copy": nbytes,
            "counted": "bytes read + written", "ms": sig(ms), "statistic": statistic, "timer": timer}


def achieved_gbps(grad_bytes: int, ms: float) -> float:
    """GB/s of one clip of ``grad_bytes`` of gradients in ``ms``: BYTES_PER_GRAD_BYTE x the bytes moved."""
    return BYTES_PER_GRAD_BYTE * grad_bytes / (ms * 1e-3) / 1e9


def count_launches(call: Callable[[], None], reset: Callable[[], None]) -> dict:
    """Kernels (and memcpy/memset operations) that one ``call`` runs on the GPU, seen by torch.profiler."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    reset()
    torch.cuda.synchronize()
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            call()
            torch.cuda.synchronize()
        events = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    except Exception as e:  # a profiler that cannot start must not cost the row its timing
        return {"kernel_launches": None, "device_copies": None, "profile_note": f"{type(e).__name__}: {e}"[:300]}
    kernels = copies = 0
    for e in events:
        kind = getattr(e, "activity_type", None)  # kineto's 'kernel', 'gpu_memcpy', ...; absent in older torch
        if (kind or "").startswith("gpu_mem") or e.name.startswith(("Memcpy", "Memset")):
            copies += 1
        elif kind in (None, "kernel"):
            kernels += 1
    if kernels == 0:  # every clip launches a kernel: the profiler saw nothing (no CUPTI?)
        return {"kernel_launches": None, "device_copies": None, "profile_note": "the profiler saw no kernels"}
    return {"kernel_launches": kernels, "device_copies": copies}


def host_sync_free(call: Callable[[], None], reset: Callable[[], None]) -> tuple[bool, str | None]:
    """Whether one ``call`` runs without a host synchronisation (``set_sync_debug_mode("error")``)."""
    reset()
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        call()
    except RuntimeError as e:
        return False, str(e).strip().splitlines()[0][:300] if str(e).strip() else "RuntimeError"
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    return True, None


# ---------------------------------------------------------------------------------------------------------
# The run: rows, summary, JSON record.
# ---------------------------------------------------------------------------------------------------------

@dataclass(kw_only=True)
class Config(harness.Common):
    """What one run measures (resolved from the command line)."""

    cases: list[str]
    dtypes: list[str]
    repeat: int | None

    def describe(self) -> dict:
        return {"cases": self.cases, "dtypes": self.dtypes, "variants": self.variants, "quick": self.quick,
                "repeat": self.repeat, "backend": self.backend, "seed": self.seed,
                "case_notes": {c: CASE_NOTES[c] for c in self.cases},
                "mixed": "tensors alternate bfloat16 / float32 in parameter order",
                "max_norm": f"{CLIP_FRACTION} x the total norm of the gradients: every call clips",
                "gradients": "random normal, restored from a saved copy before every timed call (outside it)",
                "gbps": f"{BYTES_PER_GRAD_BYTE} x gradient bytes per call (norm: read; scale: read + write)",
                "check": "loop, cnnperf vs torch (total, gradients) and float64 (total; cnnperf: gradients too)",
                "skipped_cases": self.skipped}


def bench_case(cfg: Config, case: Case, dtype: str, copy_gbps: float, common: dict,
               log: Callable[[str], None] | None = None) -> list[dict]:
    """Rows for one case and dtype: every variant on the same gradients, with speed-ups over torch."""
    base = {**common, "dtype": dtype, "case": case.name, "tensors": case.tensors, "elements": case.elements,
            "grad_bytes": case.grad_bytes(dtype), "bytes_moved": BYTES_PER_GRAD_BYTE * case.grad_bytes(dtype)}
    try:
        grads = make_grads(case, dtype, cfg.device, cfg.seed)
    except Exception as e:  # e.g. out of memory: the other cases still run
        return [{**base, "variant": v, **harness.error_fields(e, MEASURES)} for v in cfg.variants]
    base.update(max_norm=sig(grads.max_norm), total_norm=sig(grads.total_norm), clip_coef=sig(grads.clip_coef))
    rows = []
    for variant in cfg.variants:
        if log:
            log(f"  {variant}")
        rows.append(bench_variant(cfg, variant, grads, copy_gbps, base))
    harness.add_speedups([r for r in rows if r["variant"] in CLIP_VARIANTS], "torch")
    add_step_overheads(rows)
    return rows


def add_step_overheads(rows: Sequence[dict]) -> None:
    """``step_time_over_adamw`` = t_variant / t_adamw on the step rows but ``adamw`` itself (1.15: the clip adds
    15% to the step)."""
    ref = next((r.get("median_ms") for r in rows if r["variant"] == "adamw"), None)
    for r in rows:
        if r["variant"] in STEP_VARIANTS and r["variant"] != "adamw":
            r["step_time_over_adamw"] = sig(r["median_ms"] / ref) if ref and r.get("median_ms") else None


def bench_variant(cfg: Config, variant: str, grads: Grads, copy_gbps: float, base: dict) -> dict:
    """One result row. A variant that raises gives a row with ``error`` and no timing, and the run goes on."""
    row = {**base, "variant": variant}
    cuda = cfg.device.type == "cuda"
    try:
        fn = make_variant(variant, cfg.backend)

        def call():
            fn(grads.params, grads.max_norm)

        if variant in ("cnnperf", "cnnperf_in_adamw"):
            row.update(backend=cfg.backend, path=cnnperf_path(cfg.backend, cfg.device))
        if variant == "cnnperf":
            row["host_us"] = sig(host_us(grads.params, grads.max_norm))
        if variant not in ("torch", "adamw", "torch+adamw"):  # (the step writes the clipped gradients back)
            row.update(check_variant(fn, grads, strict=variant != "loop"))
        grads.restore()
        call()  # compiles the Triton kernels and caches cnnperf's device table, outside every measurement
        if cuda:
            row["host_sync_free"], sync = host_sync_free(call, grads.restore)
            if sync:
                row["host_sync"] = sync  # what synchronised
            row.update(count_launches(call, grads.restore))
        else:
            row.update(host_sync_free=None, kernel_launches=None)
        t = time_clip(call, grads, cfg.device, cfg.quick, cfg.repeat)
    except Exception as e:
        row.update(harness.error_fields(e, MEASURES))
        return row
    finally:
        grads.restore()
    row.update(harness.timing_fields(t))
    if variant in CLIP_VARIANTS:
        gbps = achieved_gbps(base["grad_bytes"], t.median_ms)
        row.update(gbps=sig(gbps), pct_copy_bw=sig(100 * gbps / copy_gbps))
    return row


class _NoLaunch:
    """Stands for a Triton kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


HOST_ROUNDS = 7
HOST_CALLS = 50  # per round


def host_us(params: list, max_norm: float) -> float:
    """Median over rounds of the host time of one ``clip_grad_norm_`` call on cnnperf's Triton path with its kernel
    launches made no-ops (see the module docstring), in microseconds."""
    from unittest import mock

    from cnnperf.ops import grad_norm as ops

    kernels = ops._kernels()
    names = [n for n in vars(kernels) if n.startswith("_grad_") and n.endswith("_kernel")]
    with contextlib.ExitStack() as stack:
        for name in names:
            stack.enter_context(mock.patch.object(kernels, name, _NoLaunch()))
        stack.enter_context(mock.patch.object(backend, "choose", lambda *args: "triton"))
        stack.enter_context(mock.patch.object(backend, "interpret", lambda: False))
        clip_grad_norm_(params, max_norm)  # the first call checks everything and leaves the plan
        rounds = []
        for _ in range(HOST_ROUNDS):
            start = time.perf_counter()
            for _ in range(HOST_CALLS):
                clip_grad_norm_(params, max_norm)
            rounds.append((time.perf_counter() - start) / HOST_CALLS * 1e6)
    return sorted(rounds)[len(rounds) // 2]


def summarize(rows: Sequence[dict]) -> dict:
    """``{"speedup_vs_torch": {dtype: {case: {variant: x}}}, "geomean_speedup_vs_torch": {dtype: {variant: x}}}``,
    and, with step rows, ``"step_time_over_adamw": {dtype: {case: {variant: x}}}``."""
    per_case: dict = {}
    steps: dict = {}
    for r in rows:
        if r.get("speedup_vs_torch"):
            per_case.setdefault(r["dtype"], {}).setdefault(r["case"], {})[r["variant"]] = r["speedup_vs_torch"]
        if r.get("step_time_over_adamw"):
            steps.setdefault(r["dtype"], {}).setdefault(r["case"], {})[r["variant"]] = r["step_time_over_adamw"]
    geomeans: dict = {}
    for dtype, cases in per_case.items():
        by_variant: dict = {}
        for variants in cases.values():
            for variant, ratio in variants.items():
                by_variant.setdefault(variant, []).append(ratio)
        geomeans[dtype] = {v: sig(geomean(r)) for v, r in by_variant.items()}
    out = {"speedup_vs_torch": per_case, "geomean_speedup_vs_torch": geomeans}
    if steps:
        out["step_time_over_adamw"] = steps
    return out


def run(cfg: Config, out: Path | None, argv: Sequence[str],
        log: Callable[[str], None] | None = None) -> tuple[dict, Path]:
    """Benchmark every dtype x case of ``cfg``, rewriting the JSON record at ``out`` after each
    (:func:`cnnperf.benchmarks.harness.run`). Returns the record and the path it was written to."""
    common = {"device": device_name(cfg.device), "versions": versions()}
    copy_bw = measure_copy_bandwidth(cfg.device)

    def measure(item) -> list[dict]:
        dtype, name = item
        rows = bench_case(cfg, make_case(name), dtype, copy_bw["gbps"], common, log)
        if cfg.device.type == "cuda":
            torch.cuda.empty_cache()  # the next case allocates gradients of another size
        return rows

    def describe(item) -> str:
        dtype, name = item
        case = make_case(name)
        return f"{name} ({case.tensors} tensors, {case.elements:,} elements), {dtype}"

    return harness.run(tool="cnnperf bench-clip", schema=SCHEMA, prefix="bench_clip", device=cfg.device, out=out,
                       argv=argv, config=cfg.describe(), header={"copy_bandwidth": copy_bw},
                       cases=[(dtype, name) for dtype in cfg.dtypes for name in cfg.cases], measure=measure,
                       summarize=summarize, describe=describe, log=log)


# ---------------------------------------------------------------------------------------------------------
# Terminal output.
# ---------------------------------------------------------------------------------------------------------

# The bench-clip columns a narrow terminal drops, the first first (a log keeps them all).
CLIP_OPTIONAL_COLUMNS = ("launches", "tensors", "MB", "% copy", "GB/s", "p20-p80 ms", "no sync", "host us", "step x")


def print_results(record: dict, console) -> None:
    """The results table, one line per dtype, case and variant, fitted to ``console``."""
    from rich.markup import escape

    bw = record["copy_bandwidth"]
    title = (f"gradient norm + clip on {escape(record['device'])}; copy bandwidth {bw['gbps']:.4g} GB/s "
             f"({escape(bw['what'])})")
    columns = ["dtype", "case", "tensors", "MB", "variant", "median ms", "p20-p80 ms", "GB/s", "% copy",
               "host us", "launches", "no sync", "vs torch", "step x", "check"]
    heads = [(name, "left" if name in ("dtype", "case", "variant", "check") else "right") for name in columns]
    rows = []
    for r in record["rows"]:
        if "error" in r:
            timing = ["[red]error[/]", "-", "-", "-"]
        else:
            timing = [f"{r['median_ms']:.4g}", f"{r['p20_ms']:.4g}-{r['p80_ms']:.4g}", fmt(r.get("gbps")),
                      fmt(r.get("pct_copy_bw"), ".3g")]
        ratio = r.get("speedup_vs_torch")
        free = r.get("host_sync_free")
        check = r.get("check")
        rows.append(([
            r["dtype"], r["case"], str(r["tensors"]), f"{r['grad_bytes'] / 1e6:.4g}", r["variant"], *timing,
            fmt(r.get("host_us"), ".3g"), fmt(r.get("kernel_launches"), "d"),
            "-" if free is None else ("[green]yes[/]" if free else "[red]NO[/]"),
            harness.speedup_cell(ratio), fmt(r.get("step_time_over_adamw"), ".3g"), harness.check_cell(check)], None))
    _terminal.print_table(console, heads, rows, optional=CLIP_OPTIONAL_COLUMNS, title=title)


def print_report(record: dict, console) -> None:
    """The results table, then the geomean speed-ups, errors and skipped cases."""
    from rich.markup import escape

    print_results(record, console)
    for dtype, by_variant in record["summary"].get("geomean_speedup_vs_torch", {}).items():
        cases = ", ".join(record["summary"]["speedup_vs_torch"][dtype])
        for variant, ratio in by_variant.items():
            console.print(f"{dtype:8} {variant}/torch: geomean {ratio:.3f}x over {cases}")
    for dtype, by_case in record["summary"].get("step_time_over_adamw", {}).items():
        for case, by_variant in by_case.items():
            said = ", ".join(f"{v} {x:.3g}x" for v, x in by_variant.items())
            console.print(f"{dtype:8} {case}: time over the AdamW step alone: {said}")
    for r in record["rows"]:
        if "error" in r:
            console.print(f"[red]error[/] {r['dtype']} {r['case']} {r['variant']}: {escape(r['error'])}")
        if r.get("host_sync"):
            console.print(f"[red]host sync[/] {r['dtype']} {r['case']} {r['variant']}: {escape(r['host_sync'])}")
    for case, why in record["config"]["skipped_cases"].items():
        console.print(f"[yellow]{case} not run[/]: {escape(why)}")


# ---------------------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = _cli.Parser(prog="cnnperf bench-clip",
                    description="Time the fused gradient norm + clip (cnnperf.clip_grad_norm_) against torch's "
                                "clip_grad_norm_ (foreach) and a per-parameter loop on the gradients of "
                                "ResNet-50, VGG-16 and 1000 tiny tensors; print a table, write a JSON record.")
    p.add_argument("--case", dest="cases", type=_cli.choice_list(CASES), default=None,
                   help="resnet50, vgg16, tiny, a comma list, or all (default: all; resnet50,tiny with --quick)")
    p.add_argument("--dtype", dest="dtypes", type=_cli.choice_list(DTYPES, _cli.DTYPE_ALIASES), default=["float32"],
                   help="float32 (default), bfloat16, float16, mixed (bf16/fp32 alternating), a comma list, or all")
    p.add_argument("--repeat", type=_cli.positive_int, default=None,
                   help="timed calls per row (default: as many as fit in the time per row)")
    harness.add_common_arguments(p, VARIANTS, f"comma list of {', '.join(VARIANTS)} (default: all)",
                                 "short timing, and VGG-16 left out of the default cases", "bench_clip")
    return p


def resolve_config(args: argparse.Namespace) -> Config:
    """Fill in the defaults that depend on the machine; UsageError for combinations that cannot run."""
    device, quick, requested = harness.resolve_common(args)
    if requested == "triton" and not backend.device_runs_triton(device.type):
        raise _cli.UsageError(f"--backend triton: Triton kernels cannot run on {device.type} tensors here "
                              "(on the CPU they need TRITON_INTERPRET=1)")
    skipped = {}
    if args.cases is not None:
        cases = args.cases
    elif quick:
        cases = list(QUICK_CASES)
        skipped["vgg16"] = ("left out by --quick (the default without a GPU): 138M gradients, 553 MB per fp32 "
                            "copy; add it with --case all or --no-quick")
    else:
        cases = list(CASES)
    return Config(variants=args.variants or list(VARIANTS), device=device, quick=quick, backend=requested,
                  skipped=skipped, out=args.out, cases=cases, dtypes=args.dtypes, repeat=args.repeat)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry of ``cnnperf bench-clip``. 0: all ran and every check passed; 1: a variant failed, a check failed
    or cnnperf synchronised with the host; 2: bad command line."""
    def failed(record: dict) -> list[dict]:
        return harness.failed_rows(
            record, lambda r: r["variant"] == "cnnperf" and r.get("host_sync_free") is False)

    return harness.main("cnnperf bench-clip", argv, lambda a: resolve_config(build_parser().parse_args(a)),
                        lambda cfg, args, log: run(cfg, cfg.out, args, log), print_report, failed,
                        "errors, numerical checks or host syncs")


if __name__ == "__main__":
    import sys

    sys.exit(main())
