"""``cnnperf bench``: time the fused conv2d + bias + ReLU against eager PyTorch and torch.compile.

What is measured, per convolution shape of ResNet-50 and VGG-16 (batch 32, 224x224 images):

- variants: ``eager`` (``F.conv2d`` with bias, then ``F.relu``), ``compile`` (``torch.compile`` of that same
  function) and ``cnnperf`` (:func:`cnnperf.functional.conv2d_bias_relu`);
- passes: ``fwd`` and ``fwdbwd`` (forward, then backward of a fixed random output gradient into input, weight
  and bias).

The shapes are not a hand-written table: they are read from torchvision's models by forward hooks on a run
on the ``meta`` device (no memory, no compute), and identical shapes are kept once, under the name of their
first layer. Each result row carries the device, dtype, shape, timing quantiles, TFLOP/s, the fraction of the
device's measured matmul peak, speed-ups over eager, the numerical check of the cnnperf result and the
versions; the whole run is written as one JSON record (atomically, after every shape, so a run that is cut
short still leaves its finished rows).

Timing: on CUDA ``triton.testing.do_bench`` (it flushes L2 before every run; medians and 20/80 % quantiles).
On the CPU a host clock with warm-up and repeats (:mod:`cnnperf._timing`). On a machine without a GPU
``--quick`` is the default: the same layers at batch 2 on 56x56 images, so that a run takes seconds, not hours;
its numbers only show that the harness works.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from cnnperf import _cli, _terminal, backend, testing
from cnnperf._env import device_name, versions
from cnnperf._format import dtype_name, fmt, sig
from cnnperf._timing import Timing, geomean, time_cuda, time_host
from cnnperf.benchmarks import harness
from cnnperf.conv_shapes import FULL_BATCH, FULL_IMAGE, MODELS, ConvShape, conv_shapes
from cnnperf.functional import conv2d_bias_relu
from cnnperf.ops import conv_bias_relu as conv_op

PASSES = ("fwd", "fwdbwd")
VARIANTS = ("eager", "compile", "cnnperf")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

QUICK_BATCH, QUICK_IMAGE = 2, 56  # image / 4: every layer keeps a spatial size >= 2 (ResNet layer4: 2x2)
QUICK_EVERY = 4  # --quick measures every 4th shape (the stem included): 6 of ResNet-50's 23, 3 of VGG-16's 9

# The inputs of one timed call are rotated among copies until together they hold at least this many bytes,
# so a small layer does not run from a cache that a real network would have evicted (on CUDA do_bench also
# flushes L2 before each run; rotation keeps the CPU timer honest too).
ROTATE_MIN_BYTES = 128 << 20
ROTATE_MAX_COPIES = 8

SCHEMA = "cnnperf.bench/1"


# ---------------------------------------------------------------------------------------------------------
# Shapes: read from torchvision's models.
# ---------------------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------------------
# Variants: eager, torch.compile of eager, cnnperf. Each is fn(x, w, b) -> y for one shape.
# ---------------------------------------------------------------------------------------------------------

def eager_conv_bias_relu(x, w, b, stride, padding, dilation, groups):
    """The unfused baseline: cuDNN (or oneDNN) convolution with bias, then a separate ReLU."""
    return F.relu(F.conv2d(x, w, b, stride, padding, dilation, groups))


def make_variant(variant: str, shape: ConvShape, compile_mode: str = "default",
                 backend_name: str | None = None) -> Callable:
    """``fn(x, w, b)`` computing ``relu(conv2d(x, w, b))`` for ``shape`` the way ``variant`` does."""
    args = (shape.stride, shape.padding, shape.dilation, shape.groups)
    if variant == "eager":
        return lambda x, w, b: eager_conv_bias_relu(x, w, b, *args)
    if variant == "compile":
        # One fresh dynamo cache per shape: with one cache for all shapes the recompile limit would be hit
        # after a few shapes and torch.compile would silently fall back to eager. dynamic=False: one static
        # kernel per shape, as a model compiled for fixed-size images gets.
        torch._dynamo.reset()
        return torch.compile(lambda x, w, b: eager_conv_bias_relu(x, w, b, *args),
                             mode=None if compile_mode == "default" else compile_mode, dynamic=False)
    if variant == "cnnperf":
        return harness.cnnperf_backend_fn(lambda x, w, b: conv2d_bias_relu(x, w, b, *args), backend_name)
    raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")


# ---------------------------------------------------------------------------------------------------------
# Inputs: random (never zeros: some hardware is measurably faster on zeros), rotated among copies.
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Inputs:
    """One set of call arguments, and the output gradient for the backward (None for the forward pass)."""

    x: torch.Tensor
    w: torch.Tensor
    b: torch.Tensor
    grad: torch.Tensor | None

    def leaves(self) -> list[torch.Tensor]:
        return [self.x, self.w, self.b]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.x, self.w, self.b, self.grad) if t is not None)


def make_inputs(shape: ConvShape, dtype: torch.dtype, memory_format: torch.memory_format, backward: bool,
                generator: torch.Generator) -> Inputs:
    """Random input, weight (scaled by 1/sqrt(fan_in), so outputs stay O(1)), bias, and for ``backward`` a
    random output gradient, on the generator's device; input, weight and bias then require grad.
    """
    def randn(*size, scale=1.0):
        t = torch.randn(*size, generator=generator, device=generator.device, dtype=dtype)
        return t.mul_(scale).contiguous(memory_format=memory_format) if len(size) == 4 else t.mul_(scale)

    fan_in = shape.c_in // shape.groups * shape.kh * shape.kw
    x = randn(*shape.input_shape)
    w = randn(*shape.weight_shape, scale=fan_in ** -0.5)
    b = randn(shape.c_out, scale=0.1)
    grad = randn(shape.n, shape.c_out, *shape.output_hw) if backward else None
    for t in (x, w, b):
        t.requires_grad_(backward)
    return Inputs(x, w, b, grad)


def rotation_count(set_bytes: int) -> int:
    """How many input copies to rotate among so that together they exceed ROTATE_MIN_BYTES."""
    return max(1, min(ROTATE_MAX_COPIES, math.ceil(ROTATE_MIN_BYTES / max(1, set_bytes))))


def input_sets(cfg: Config, shape: ConvShape, pass_: str) -> list[Inputs]:
    """The input copies one timed call rotates among (the same seed every time: reruns time equal data)."""
    gen = torch.Generator(cfg.device).manual_seed(cfg.seed)
    make = functools.partial(make_inputs, shape, cfg.dtype, cfg.memory_format, pass_ == "fwdbwd", gen)
    first = make()
    return [first] + [make() for _ in range(rotation_count(first.nbytes()) - 1)]


def make_call(fn: Callable, pass_: str, sets: Sequence[Inputs]) -> Callable[[], None]:
    """A no-argument call of ``fn`` for one ``pass_``, taking the next input set each time."""
    rotation = itertools.cycle(sets)
    if pass_ == "fwd":
        def call():
            s = next(rotation)
            fn(s.x, s.w, s.b)
    else:
        def call():
            s = next(rotation)
            fn(s.x, s.w, s.b).backward(s.grad)
    return call


def clear_grads(sets: Sequence[Inputs]) -> None:
    """Drop accumulated gradients (outside the timed region) so every backward writes fresh ones."""
    for s in sets:
        for t in s.leaves():
            t.grad = None


# ---------------------------------------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------------------------------------

def time_call(call: Callable[[], None], device: torch.device, sets: Sequence[Inputs], pass_: str,
              budget_s: float) -> Timing:
    """do_bench on CUDA, the host timer elsewhere; gradients are cleared before every backward."""
    leaves = [t for s in sets for t in s.leaves()] if pass_ == "fwdbwd" else None
    if device.type == "cuda":
        return time_cuda(call, grad_to_none=leaves)
    return time_host(call, device, reset=(lambda: clear_grads(sets)) if leaves else None, budget_s=budget_s)


def measure_matmul_peak(device: torch.device) -> dict:
    """The device's matmul throughput, measured once per run: the denominator of "% of peak".

    CUDA: the median of an 8192^3 bf16 matmul with do_bench (what the tensor cores reach in practice). CPU:
    the fastest of repeated 1024^3 fp32 matmuls (a modest size; on a shared CPU the median includes time the
    process was descheduled, and the fastest run is the closer estimate of what the cores can do).
    """
    if device.type == "cuda":
        size, dtype = 8192, torch.bfloat16
    else:
        size, dtype = 1024, torch.float32
    g = torch.Generator(device).manual_seed(1)
    a, b = (torch.randn(size, size, generator=g, device=device, dtype=dtype) for _ in range(2))
    call = functools.partial(torch.matmul, a, b)
    if device.type == "cuda":
        ms, statistic, timer = time_cuda(call).median_ms, "median", "triton.testing.do_bench"
    else:
        ms, statistic, timer = time_host(call, device, budget_s=0.5, min_reps=10).min_ms, "min", "time.perf_counter"
    return {"tflops": sig(2 * size**3 / (ms * 1e-3) / 1e12), "dtype": dtype_name(dtype), "m": size, "n": size,
            "k": size, "ms": sig(ms), "statistic": statistic, "timer": timer}


# ---------------------------------------------------------------------------------------------------------
# Numerical check of cnnperf against eager in float64 (the tolerance table of cnnperf.testing).
# ---------------------------------------------------------------------------------------------------------

def check_cnnperf(fn: Callable, shape: ConvShape, pass_: str, inputs: Inputs) -> dict:
    """Compare ``fn`` (the cnnperf variant) with eager float64 on the same rounded inputs, once per row.

    Returns ``{"check": "ok" | "FAIL ...", "check_err": worst error as a multiple of its tolerance}``; a value
    of ``check_err`` above 1 is a failure. For ``fwdbwd`` the three gradients are checked too.
    """
    backward = pass_ == "fwdbwd"
    leaves = [t.detach().requires_grad_(backward) for t in inputs.leaves()]
    out = fn(*leaves)
    results = {"output": out}
    if backward:
        results.update(zip(("grad_input", "grad_weight", "grad_bias"),
                           torch.autograd.grad(out, leaves, inputs.grad)))
    ref_leaves = [t.detach().double().requires_grad_(backward) for t in leaves]
    ref_out = eager_conv_bias_relu(*ref_leaves, shape.stride, shape.padding, shape.dilation, shape.groups)
    refs = {"output": ref_out}
    if backward:
        refs.update(zip(("grad_input", "grad_weight", "grad_bias"),
                        torch.autograd.grad(ref_out, ref_leaves, inputs.grad.double())))

    dtype = inputs.x.dtype
    tf32 = dtype == torch.float32 and inputs.x.is_cuda and torch.backends.cudnn.allow_tf32
    tol = testing.tolerance(dtype, tf32=tf32)
    worst, failure = 0.0, None
    for name, actual in results.items():
        ref = refs[name].detach()
        scale = max(1.0, ref.abs().max().item())
        # The error in units of the tolerance that testing.assert_close allows: |a - r| <= atol*scale + rtol*|r|.
        allowed = tol.atol * scale + tol.rtol * ref.abs()
        err = ((actual.detach().double() - ref).abs() / allowed).max().item()
        worst = max(worst, err)
        if failure is None:
            try:
                testing.assert_close(actual, ref, dtype, tf32=tf32, name=name)
            except AssertionError as e:
                failure = f"FAIL {str(e).splitlines()[0]}"
    return {"check": failure or "ok", "check_err": sig(worst)}


# ---------------------------------------------------------------------------------------------------------
# The run: rows, summary, JSON record.
# ---------------------------------------------------------------------------------------------------------

@dataclass(kw_only=True)
class Config(harness.Common):
    """What one run measures (resolved from the command line)."""

    models: list[str]
    passes: list[str]
    dtype: torch.dtype
    batch: int
    image_size: int
    limit: int | None
    every: int
    memory_format: torch.memory_format
    compile_mode: str
    time_budget_s: float | None
    cudnn_benchmark: bool = True

    def shapes(self) -> list[ConvShape]:
        rows = []
        for model in self.models:
            rows += conv_shapes(model, self.batch, self.image_size)[::self.every][:self.limit]
        return rows

    def describe(self) -> dict:
        return {"models": self.models, "passes": self.passes, "variants": self.variants,
                "dtype": dtype_name(self.dtype), "batch": self.batch, "image_size": self.image_size,
                "quick": self.quick, "every": self.every, "limit": self.limit,
                "memory_format": _format_name(self.memory_format), "compile_mode": self.compile_mode,
                "backend": self.backend, "time_budget_s": self.time_budget_s,
                "cudnn_benchmark": self.cudnn_benchmark, "seed": self.seed,
                "skipped_variants": self.skipped}


def _format_name(fmt: torch.memory_format) -> str:
    return "channels_last" if fmt == torch.channels_last else "contiguous"


def cnnperf_path(cfg: Config, x: torch.Tensor, w: torch.Tensor) -> str:
    """Which implementation the cnnperf variant ran: 'triton', 'reference', or per direction under auto (what
    the op chose for these shapes, :func:`cnnperf.ops.conv_bias_relu.auto_choices`)."""
    if cfg.backend == "reference" or not backend.device_runs_triton(x.device.type):
        return "reference"
    if cfg.backend == "triton" or x.device.type != "cuda":
        return "triton"
    picks = conv_op.auto_choices(x.shape, w.shape, x.dtype)
    return ",".join(f"{d}={picks[d]}" for d in ("fwd", "bwd") if d in picks) or "auto"


def bench_shape(cfg: Config, shape: ConvShape, peak_tflops: float, budget_s: float, common: dict) -> list[dict]:
    """Rows for one shape: every pass x variant, with the numerical check on the cnnperf rows."""
    rows = []
    for pass_ in cfg.passes:
        sets = input_sets(cfg, shape, pass_)
        pass_rows = [bench_variant(cfg, shape, pass_, variant, sets, peak_tflops, budget_s, common)
                     for variant in cfg.variants]
        harness.add_speedups(pass_rows, "eager")
        rows += pass_rows
        del sets  # free the device memory before the next pass allocates its own
    return rows


def bench_variant(cfg: Config, shape: ConvShape, pass_: str, variant: str, sets: Sequence[Inputs],
                  peak_tflops: float, budget_s: float, common: dict) -> dict:
    """One result row. A variant that raises gives a row with ``error`` and no timing, and the run goes on."""
    row = {**common, **shape.fields(), "pass": pass_, "variant": variant}
    try:
        fn = make_variant(variant, shape, cfg.compile_mode, cfg.backend)
        if variant == "cnnperf":
            row.update(backend=cfg.backend, **check_cnnperf(fn, shape, pass_, sets[0]))
        elif variant == "compile":
            row["compile_mode"] = cfg.compile_mode
        t = time_call(make_call(fn, pass_, sets), cfg.device, sets, pass_, budget_s)
    except Exception as e:  # an unsupported shape or a compile failure must not lose the rest of the run
        row.update(harness.error_fields(e, ("tflops", "pct_peak")))
        return row
    finally:
        clear_grads(sets)
    if variant == "cnnperf":
        row["path"] = cnnperf_path(cfg, sets[0].x, sets[0].w)
        if sets[0].x.device.type == "cuda":  # what the kernels launched with, for `cnnperf audit --compare`
            row["configs"] = conv_op.launch_configs(shape.input_shape, shape.weight_shape, shape.stride,
                                                    shape.padding, shape.dilation, shape.groups, cfg.dtype, True,
                                                    sets[0].x.device)
    tflops = shape.flops(pass_) / (t.median_ms * 1e-3) / 1e12
    row.update(harness.timing_fields(t), gflop=sig(shape.flops(pass_) / 1e9), tflops=sig(tflops),
               pct_peak=sig(100 * tflops / peak_tflops))
    return row


def summarize(rows: Sequence[dict]) -> dict:
    """Per pass, per model, per non-eager variant: geomean speed-up over eager, and the worst shape.

    ``{"fwd": {"resnet50": {"cnnperf": {"geomean_speedup", "min_speedup", "min_shape", "shapes"}}}}``.
    """
    summary: dict = {}
    for row in rows:
        ratio = row.get("speedup_vs_eager")
        if ratio is None or ratio <= 0:
            continue
        entry = summary.setdefault(row["pass"], {}).setdefault(row["model"], {}).setdefault(row["variant"], [])
        entry.append((ratio, row["name"]))
    for models in summary.values():
        for variants in models.values():
            for variant, ratios in variants.items():
                worst = min(ratios)
                variants[variant] = {"geomean_speedup": sig(geomean([r for r, _ in ratios])),
                                     "min_speedup": worst[0], "min_shape": worst[1], "shapes": len(ratios)}
    return summary


def row_context(cfg: Config) -> dict:
    """The fields every result row of a run shares: device, dtype, memory format, versions."""
    return {"device": device_name(cfg.device), "dtype": dtype_name(cfg.dtype),
            "memory_format": _format_name(cfg.memory_format), "versions": versions()}


def run(cfg: Config, out: Path | None, argv: Sequence[str],
        log: Callable[[str], None] | None = None) -> tuple[dict, Path]:
    """Benchmark every shape of ``cfg``, rewriting the JSON record at ``out`` after each shape
    (:func:`cnnperf.benchmarks.harness.run`). Returns the record and the path it was written to."""
    common = row_context(cfg)
    peak = measure_matmul_peak(cfg.device)
    budget_s = 0.1 if cfg.quick else 1.0  # host timer only; do_bench chooses its own repeats
    previous_cudnn_benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = cfg.cudnn_benchmark  # the eager baseline (and cuDNN inside cnnperf)
    try:
        return harness.run(
            tool="cnnperf bench", schema=SCHEMA, prefix="bench_conv", device=cfg.device, out=out, argv=argv,
            config=cfg.describe(), header={"peak": peak}, cases=cfg.shapes(),
            measure=lambda shape: bench_shape(cfg, shape, peak["tflops"], budget_s, common),
            summarize=summarize, time_budget_s=cfg.time_budget_s, log=log, case_noun="shapes",
            describe=lambda s: f"{s.name} {tuple(s.input_shape)} -> {s.c_out}, {s.kh}x{s.kw}/{s.stride[0]}")
    finally:
        torch.backends.cudnn.benchmark = previous_cudnn_benchmark


# ---------------------------------------------------------------------------------------------------------
# Terminal output.
# ---------------------------------------------------------------------------------------------------------

def print_report(record: dict, console) -> None:
    """The results table, then the summary and anything that did not run."""
    print_results(record, console)
    print_summary(record, console)


def print_results(record: dict, console) -> None:
    """The results table, one line per shape and pass with the variants side by side, fitted to ``console``
    (a narrow terminal keeps shape, pass, the speed-ups and the check)."""
    from rich.markup import escape

    cfg, peak = record["config"], record["peak"]
    variants = cfg["variants"]
    others = [v for v in variants if v != "eager"]
    fused = "cnnperf" in variants
    title = (f"conv2d+bias+ReLU on {escape(record['device'])} ({cfg['dtype']}, {cfg['memory_format']}); "
             f"peak {peak['tflops']:.3g} TFLOP/s ({peak['dtype']} matmul)")
    times = [f"{v} ms" for v in variants]
    columns = (["shape", "pass"] + times + (["cnnperf TFLOP/s", "% peak"] if fused else [])
               + [f"{v}/eager" for v in others] + (["check"] if fused else []))
    heads = [(name, "left" if name in ("shape", "pass", "check") else "right") for name in columns]

    grouped: dict[tuple, dict] = {}
    for row in record["rows"]:
        grouped.setdefault((row["name"], row["pass"]), {})[row["variant"]] = row
    rows = []
    for (name, pass_), by_variant in grouped.items():
        cells = [name, pass_]
        cells += ["[red]error[/]" if "error" in r else fmt(r.get("median_ms"), ".3f")
                  for r in (by_variant.get(v, {}) for v in variants)]
        if fused:
            cells += [fmt(by_variant["cnnperf"].get("tflops"), ".3g"),
                      fmt(by_variant["cnnperf"].get("pct_peak"), ".3g")]
        cells += [harness.speedup_cell(by_variant.get(v, {}).get("speedup_vs_eager")) for v in others]
        if fused:
            cells.append(harness.check_cell(by_variant["cnnperf"].get("check", "-")))
        rows.append((cells, None))
    optional = (["cnnperf TFLOP/s"] if fused else []) + times[::-1] + (["% peak"] if fused else [])
    _terminal.print_table(console, heads, rows, optional=optional, title=title)


def print_summary(record: dict, console) -> None:
    """Geomean and worst speed-up per pass, model and variant; then errors, skipped variants, early stop."""
    from rich.markup import escape

    for pass_, models in record["summary"].items():
        for model, by_variant in models.items():
            for variant, s in by_variant.items():
                console.print(f"{pass_:7} {model:9} {variant}/eager: geomean {s['geomean_speedup']:.3f}x over "
                              f"{s['shapes']} shapes, min {s['min_speedup']:.3f}x ({s['min_shape']})")
    for row in record["rows"]:
        if "error" in row:
            console.print(f"[red]error[/] {row['name']} {row['pass']} {row['variant']}: {escape(row['error'])}")
    for variant, why in record["config"]["skipped_variants"].items():
        console.print(f"[yellow]{variant} not run[/]: {escape(why)}")
    if record.get("stopped_early"):
        console.print(f"[yellow]stopped early[/]: {escape(record['stopped_early'])}")


# ---------------------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = _cli.Parser(prog="cnnperf bench",
                    description="Time the fused conv2d + bias + ReLU against eager PyTorch and torch.compile on the "
                                "convolution shapes of ResNet-50 and VGG-16; print a table, write a JSON record.")
    p.add_argument("--model", type=_cli.choice_list(MODELS), default=list(MODELS),
                   help="resnet50, vgg16, a comma list, or all (default)")
    p.add_argument("--pass", dest="passes", type=_cli.choice_list(PASSES), default=list(PASSES),
                   help="fwd, fwdbwd, or all (default)")
    p.add_argument("--no-compile", action="store_true", help="leave out the compile variant")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default=None,
                   help="torch.compile mode (default: max-autotune-no-cudagraphs on a GPU, default on the CPU)")
    p.add_argument("--dtype", type=_cli.dtype_name(DTYPES), default=None,
                   help="bfloat16 (GPU default), float16, float32 (CPU default)")
    p.add_argument("--batch", type=_cli.positive_int, default=None,
                   help=f"batch size (default {FULL_BATCH}, {QUICK_BATCH} with --quick)")
    p.add_argument("--image-size", type=_cli.positive_int, default=None,
                   help=f"image side the shapes are derived at (default {FULL_IMAGE}, {QUICK_IMAGE} with --quick)")
    p.add_argument("--every", type=_cli.positive_int, default=None,
                   help=f"every N-th shape of each model (default {QUICK_EVERY} with --quick, else 1)")
    p.add_argument("--limit", type=_cli.positive_int, default=None,
                   help="at most N shapes of each model (after --every)")
    p.add_argument("--memory-format", choices=tuple(MEMORY_FORMATS), default="channels_last",
                   help="memory format of input, weight and output gradient (default channels_last)")
    p.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=True,
                   help="let cuDNN pick its fastest algorithm per shape, as tuned training does (default: on)")
    p.add_argument("--time-budget", type=_cli.positive_float, default=None,
                   help="start no new shape after this many seconds (the record says where it stopped)")
    harness.add_common_arguments(
        p, VARIANTS, "comma list of eager, compile, cnnperf (default: all three on a GPU; eager,cnnperf on the "
                     "CPU, where compiling every shape takes minutes)",
        f"reduced shapes: batch {QUICK_BATCH}, {QUICK_IMAGE}x{QUICK_IMAGE} images, short timing", "bench_conv")
    return p


def resolve_config(args: argparse.Namespace) -> Config:
    """Fill in the defaults that depend on the machine; UsageError for combinations that cannot run."""
    device, quick, requested = harness.resolve_common(args)
    skipped = {}
    if args.variants is not None:
        variants = args.variants
    elif device.type == "cuda":
        variants = list(VARIANTS)
    else:
        variants = ["eager", "cnnperf"]
        skipped["compile"] = ("off by default on the CPU (the first torch.compile takes ~40 s here, and every "
                              "shape recompiles); add it with --variants eager,compile,cnnperf")
    if args.no_compile and "compile" in variants:
        variants = [v for v in variants if v != "compile"]
        skipped["compile"] = "--no-compile"
    if not variants:
        raise _cli.UsageError("no variant left to run (--no-compile removed the only one asked for)")
    # max-autotune would also capture CUDA graphs, which copy every non-parameter input into graph-owned
    # buffers on each replay: a copy that neither eager nor cnnperf pays. The autotuning is the same without.
    compile_mode = args.compile_mode or ("max-autotune-no-cudagraphs" if device.type == "cuda" else "default")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    cfg = Config(variants=variants, device=device, quick=quick, backend=requested, skipped=skipped, out=args.out,
                 models=args.model, passes=args.passes, dtype=dtype,
                 batch=args.batch or (QUICK_BATCH if quick else FULL_BATCH),
                 image_size=args.image_size or (QUICK_IMAGE if quick else FULL_IMAGE), limit=args.limit,
                 every=args.every or (QUICK_EVERY if quick else 1), memory_format=MEMORY_FORMATS[args.memory_format],
                 compile_mode=compile_mode, time_budget_s=args.time_budget, cudnn_benchmark=args.cudnn_benchmark)
    try:
        cfg.shapes()  # derive them now: a size the models reject is a usage error
    except RuntimeError as e:  # the models' own shape checks, e.g. an image too small for VGG's five poolings
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise _cli.UsageError(f"--image-size {cfg.image_size} with --batch {cfg.batch}: {first}") from None
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    """Entry of ``cnnperf bench``. 0: all ran and every check passed; 1: a variant failed or a check failed;
    2: bad command line."""
    return harness.main("cnnperf bench", argv, lambda a: resolve_config(build_parser().parse_args(a)),
                        lambda cfg, args, log: run(cfg, cfg.out, args, log), print_report)


if __name__ == "__main__":
    import sys

    sys.exit(main())
