"""The profiler's variants: what each option changes, where it applies, how it is applied to copies, and how
far its numbers may be off. A *variant* is a set of *options* applied to the baseline, eager float32 training
step; its name joins its options with "+" in the fixed order of :data:`OPTIONS` ("bf16+channels_last+compile");
the baseline is "eager". :func:`prepare` builds a variant from the user's model, optimizer factory and loader
without touching them (the model deep-copied, then fused, converted, compiled, wrapped in DDP; the optimizer from
the factory; the loader rebuilt); :func:`global_switches` turns on the process-wide switches (TF32,
cudnn.benchmark) a variant names and puts them back after (the baseline runs with them as the user left them,
the numerical check's reference in IEEE float32); :data:`CHECK_BOUNDS` bounds the loss and gradient
errors of the numerical check per number format. Imports torch, :mod:`cnnperf._env` and (for "fuse")
:mod:`cnnperf.fusion`.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

BASELINE = "eager"


@dataclass(frozen=True)
class Option:
    """One thing a variant can change. ``group``: options of one group exclude each other."""

    name: str
    what: str  # one line for the reports and --help
    precision: str | None = None  # the number format it computes in, where it changes it
    group: str | None = None
    gpu_only: bool = False
    needs_loader: bool = False
    compiles: bool = False


OPTIONS = {o.name: o for o in (
    Option("workers", "DataLoader worker processes (persistent), pinned memory on a GPU", needs_loader=True),
    Option("cudnn_benchmark", "torch.backends.cudnn.benchmark: cuDNN times its algorithms per shape", gpu_only=True),
    Option("tf32", "TF32 tensor cores for float32 matmuls and convolutions", precision="tf32", group="precision",
           gpu_only=True),
    Option("bf16", "torch.autocast to bfloat16", precision="bfloat16", group="precision"),
    Option("fp16", "torch.autocast to float16 with a GradScaler", precision="float16", group="precision"),
    Option("channels_last", "model and inputs in channels_last (NHWC) memory format"),
    Option("fuse", "cnnperf.fuse: Conv2d [-> BatchNorm2d] -> ReLU as one fused layer"),
    Option("compile", "torch.compile, default mode", group="compile", compiles=True),
    Option("max_autotune", "torch.compile, mode max-autotune-no-cudagraphs", group="compile", compiles=True),
)}

# What `--variants` means when not given: every option that applies, except max-autotune on the CPU (Inductor
# benchmarks many C++ kernels per shape there; minutes for little gain). `all` includes it.
DEFAULT_EXCLUDED_ON_CPU = ("max_autotune",)


@dataclass(frozen=True)
class CheckBound:
    """How far a variant's loss and gradients may be from float32 eager in the numerical check (relative errors,
    see SCHEMA.md; a record writes them as "loss_tol" and "grad_tol")."""

    loss: float
    grad: float


# One table for the whole profiler, by the number format the variant computes in; errors as defined in
# SCHEMA.md (loss: relative, per batch; gradients: relative over all parameters together). Measured on the CPU
# at initialisation, batch 16 of random 3x32x32 images (the worst case: BatchNorm over 16 samples cancels its
# gradients almost to zero, which magnifies rounding), largest over the zoo's convnet, lenet5, alexnet_small,
# vgg11_small and resnet18: float32 in channels_last, gradient 4.5e-3, loss 3e-7; float16 autocast 0.10 and
# 6e-5; bfloat16 autocast 0.31 and 4e-4 (ResNet-18 and VGG-11 with BatchNorm; 0.03-0.1 without). The bounds
# are these with a margin; TF32 keeps float16's 10 mantissa bits and gets its bounds. A broken variant (a
# gradient lost, doubled, of the wrong sign, NaN) is off by 1 or more, far outside every bound.
CHECK_BOUNDS = {
    "float32": CheckBound(loss=1e-4, grad=2e-2),
    "tf32": CheckBound(loss=1e-2, grad=2.5e-1),
    "float16": CheckBound(loss=1e-2, grad=2.5e-1),
    "bfloat16": CheckBound(loss=3e-2, grad=5e-1),
}


class VariantError(ValueError):
    """A variant name that is not one: unknown options, or two of one group."""


def variant_name(options: Iterable[str]) -> str:
    """The canonical name of a set of options: joined with "+" in the order of OPTIONS; "eager" for none."""
    options = set(options)
    return "+".join(name for name in OPTIONS if name in options) or BASELINE


def parse_variant(name: str) -> tuple[str, ...]:
    """The options of a variant name ("bf16+channels_last"; "eager" -> ()), in canonical order.

    Raises VariantError for an unknown option or two options of one group (bf16+fp16, compile+max_autotune).
    """
    if not isinstance(name, str):
        raise VariantError(f"a variant is a name such as 'bf16+channels_last', got {type(name).__name__}")
    parts = [p.strip() for p in name.replace("-", "_").split("+") if p.strip()]
    if parts == [BASELINE] or not parts:
        return ()
    unknown = [p for p in parts if p not in OPTIONS]
    if unknown:
        raise VariantError(f"unknown option {unknown[0]!r} in variant {name!r}; options: {', '.join(OPTIONS)} "
                           f"(or {BASELINE!r})")
    groups: dict[str, str] = {}
    for p in parts:
        group = OPTIONS[p].group
        if group is not None and groups.setdefault(group, p) != p:
            raise VariantError(f"variant {name!r} has both {groups[group]} and {p}: only one {group} option")
    return tuple(o for o in OPTIONS if o in parts)


def compatible(options: Sequence[str], option: str) -> bool:
    """Whether ``option`` can join ``options`` (no other option of its group, not already in)."""
    group = OPTIONS[option].group
    return option not in options and all(group is None or OPTIONS[o].group != group for o in options)


def precision(options: Sequence[str], tf32: bool = False) -> str:
    """The number format a variant computes in: an autocast dtype, else tf32 where the variant or the process
    (``tf32``: torch's switches as the user left them, see :func:`tf32_enabled`) uses TF32, else float32."""
    named = next((OPTIONS[o].precision for o in options if OPTIONS[o].precision), None)
    return named or ("tf32" if tf32 else "float32")


def not_applicable(option: str, device: torch.device, loader=None) -> str | None:
    """Why ``option`` cannot run on ``device`` with this data (one sentence), or None when it can."""
    spec = OPTIONS[option]
    if spec.gpu_only and device.type != "cuda":
        return {"tf32": "TF32 is a number format of NVIDIA tensor cores; this run is on the CPU",
                "cudnn_benchmark": "cuDNN runs on NVIDIA GPUs only; this run is on the CPU"}[option]
    if option == "tf32" and torch.cuda.get_device_capability(device) < (8, 0):
        return "TF32 needs an Ampere (sm_80) or newer GPU"
    if option == "tf32" and all(_uses_tf32(obj, attr) for obj, attr in _fp32_switches()):
        return ("TF32 is already on for float32 matmuls and convolutions in this process: the baseline runs "
                "with it")
    if option == "cudnn_benchmark" and torch.backends.cudnn.benchmark:
        return "torch.backends.cudnn.benchmark is already on in this process: the baseline runs with it"
    if option == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "this GPU has no bfloat16 support"
    if spec.needs_loader:
        if loader is None:
            return "the steps are fed one batch held in memory: there is no DataLoader to tune"
        from torch.utils.data import IterableDataset

        if isinstance(loader.dataset, IterableDataset) and loader.num_workers == 0:
            return ("the data set is an IterableDataset: each worker would yield the whole stream unless it "
                    "shards itself with get_worker_info(), so workers are not tried")
        if worker_count(loader) <= loader.num_workers and not (device.type == "cuda" and not loader.pin_memory):
            return f"the DataLoader already has {loader.num_workers} workers" + (
                " and pinned memory" if device.type == "cuda" else "")
    if spec.compiles and not _compile_supported():
        return "torch.compile is not supported on this Python/platform"
    return None


def _compile_supported() -> bool:
    try:
        import torch._dynamo  # noqa: F401

        return torch._dynamo.is_dynamo_supported()
    except Exception:  # a broken install: measured as not applicable, never a crash
        return False


# ---------------------------------------------------------------------------------------------------------
# Loaders.
# ---------------------------------------------------------------------------------------------------------

def worker_count(loader) -> int:
    """Workers the "workers" option gives a loader: one per CPU core (up to 8), split between the processes of
    this machine under torchrun, never fewer than the loader has."""
    from cnnperf._env import cpu_count

    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(loader.num_workers, min(8, max(1, cpu_count() // max(local, 1))))


def rebuild_loader(loader, *, num_workers: int | None = None, pin_memory: bool | None = None):
    """A new DataLoader over the same data set, sampler, collate function and batch size as ``loader``, with
    other worker settings; ``loader`` itself is not touched (its sampler object is shared)."""
    from torch.utils.data import DataLoader, IterableDataset

    num_workers = loader.num_workers if num_workers is None else num_workers
    kwargs = dict(num_workers=num_workers, collate_fn=loader.collate_fn,
                  pin_memory=loader.pin_memory if pin_memory is None else pin_memory,
                  timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                  multiprocessing_context=loader.multiprocessing_context, generator=loader.generator,
                  persistent_workers=num_workers > 0)
    if num_workers > 0:
        kwargs["prefetch_factor"] = loader.prefetch_factor or 2
    if isinstance(loader.dataset, IterableDataset):
        return DataLoader(loader.dataset, batch_size=loader.batch_size, drop_last=loader.drop_last, **kwargs)
    if loader.batch_size is not None:
        return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=loader.sampler,
                          drop_last=loader.drop_last, **kwargs)
    if loader.batch_sampler is None:  # batch_size=None: the data set yields whole batches, no collation
        return DataLoader(loader.dataset, batch_size=None, sampler=loader.sampler, **kwargs)
    return DataLoader(loader.dataset, batch_sampler=loader.batch_sampler, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Process-wide switches.
# ---------------------------------------------------------------------------------------------------------

def _fp32_switches() -> list[tuple[object, str]]:
    """The (object, attribute) pairs that choose TF32 for float32 matmuls and convolutions: torch's
    fp32_precision settings where this torch has them (mixing them with the legacy allow_tf32 flags is an
    error in recent torch), else the legacy flags."""
    cuda, cudnn = torch.backends.cuda, torch.backends.cudnn
    if hasattr(cuda.matmul, "fp32_precision") and hasattr(getattr(cudnn, "conv", None), "fp32_precision"):
        return [(cuda.matmul, "fp32_precision"), (cudnn.conv, "fp32_precision")]
    return [(cuda.matmul, "allow_tf32"), (cudnn, "allow_tf32")]


def _uses_tf32(obj, attr: str) -> bool:
    return getattr(obj, attr) in ("tf32", True)


def tf32_enabled(device: torch.device) -> bool:
    """Whether float32 matmuls or convolutions on ``device`` run in TF32 as the process is set now (torch's
    default: convolutions yes, matmuls no)."""
    return device.type == "cuda" and any(_uses_tf32(obj, attr) for obj, attr in _fp32_switches())


def set_switches(options: Sequence[str], device: torch.device, *, ieee: bool = False) -> list:
    """Turn on what the variant names (TF32 for matmuls and convolutions, cudnn.benchmark) and leave the
    rest as the user has it; with ``ieee``, TF32 off everywhere (the numerical check's reference). Returns what
    :func:`restore_switches` needs to undo it. Nothing is touched on the CPU, where neither means anything."""
    if device.type != "cuda":
        return []
    pairs = _fp32_switches()
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr in pairs]
    saved.append((torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark))
    if ieee or "tf32" in options:
        for obj, attr in pairs:
            on = not ieee
            setattr(obj, attr, ("tf32" if on else "ieee") if attr == "fp32_precision" else on)
    if "cudnn_benchmark" in options:
        torch.backends.cudnn.benchmark = True
    return saved


def restore_switches(saved: list) -> None:
    for obj, attr, value in saved:
        setattr(obj, attr, value)


@contextlib.contextmanager
def global_switches(options: Sequence[str], device: torch.device, *, ieee: bool = False):
    """:func:`set_switches` for the duration of a ``with`` block."""
    saved = set_switches(options, device, ieee=ieee)
    try:
        yield
    finally:
        restore_switches(saved)


def unwrap_ddp(model: nn.Module) -> tuple[nn.Module, dict | None]:
    """The module inside a DistributedDataParallel (compiled or not) and the keyword arguments to wrap a copy
    of it the same way (None for a model that is not wrapped). Communication hooks are not carried over."""
    from torch.nn.parallel import DistributedDataParallel

    model = getattr(model, "_orig_mod", model)  # torch.compile(DDP(m)) or torch.compile(m): what was compiled
    if not isinstance(model, DistributedDataParallel):
        return model, None
    kwargs = {"device_ids": model.device_ids, "output_device": model.output_device,
              "process_group": model.process_group, "broadcast_buffers": model.broadcast_buffers,
              "find_unused_parameters": model.find_unused_parameters,
              "gradient_as_bucket_view": model.gradient_as_bucket_view,
              "static_graph": bool(getattr(model, "static_graph", False))}
    if getattr(model, "bucket_bytes_cap", None):
        kwargs["bucket_cap_mb"] = model.bucket_bytes_cap / (1024 * 1024)
    if getattr(model, "mixed_precision", None) is not None:
        kwargs["mixed_precision"] = model.mixed_precision
    return model.module, kwargs


# ---------------------------------------------------------------------------------------------------------
# Building a variant.
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Prepared:
    """A variant ready to train: its own model and optimizer, and what a step needs to run it.

    ``module`` is the model before compile/DDP (its parameters are the optimizer's); ``model`` is what the step
    calls. ``autocast`` is a context for the forward pass and the loss. ``loader`` is None when the steps are fed
    one batch held in memory.
    """

    options: tuple[str, ...]
    module: nn.Module
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    device: torch.device
    memory_format: torch.memory_format
    autocast_dtype: torch.dtype | None
    loader: object | None = None
    notes: list[str] = field(default_factory=list)

    def autocast(self):
        """The autocast context of the forward pass and the loss (a null context for float32 variants)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The model input on the variant's device and in its memory format (a 4-d tensor; others as they are)."""
        x = x.to(self.device, non_blocking=True)
        if self.memory_format is torch.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    @property
    def name(self) -> str:
        return variant_name(self.options)


def prepare(options: Sequence[str], template: nn.Module, optimizer_factory: Callable, device: torch.device, *,
            loader=None, ddp: dict | None = None) -> Prepared:
    """Build variant ``options`` from copies: ``template`` (the user's model, already copied once; not changed
    here), a new optimizer from ``optimizer_factory(parameters)``, a rebuilt ``loader``.

    ``ddp``: the keyword arguments of DistributedDataParallel to wrap the copy in (None: no DDP).
    """
    options = tuple(options)
    module = copy.deepcopy(template).to(device)
    if "fuse" in options:
        from cnnperf.fusion import fuse

        module = fuse(module, inplace=True)
    memory_format = torch.channels_last if "channels_last" in options else torch.contiguous_format
    if memory_format is torch.channels_last:
        module = module.to(memory_format=torch.channels_last)
    optimizer = optimizer_factory(module.parameters())
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer_factory must return a torch.optim.Optimizer, got {type(optimizer).__name__}")
    model = module
    if ddp is not None:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(module, **ddp)
    if "compile" in options or "max_autotune" in options:
        _quiet_cpp_extension_import()
        mode = "max-autotune-no-cudagraphs" if "max_autotune" in options else None
        model = torch.compile(model, mode=mode)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}
    autocast_dtype = next((dtype[o] for o in options if o in dtype), None)
    scaler = torch.amp.GradScaler(device.type) if "fp16" in options else None
    if loader is not None and "workers" in options:
        loader = rebuild_loader(loader, num_workers=worker_count(loader), pin_memory=device.type == "cuda")
    elif loader is not None:
        loader = rebuild_loader(loader)
    return Prepared(options, module, model, optimizer, scaler, device, memory_format, autocast_dtype, loader)


def _quiet_cpp_extension_import() -> None:
    """torch.compile imports torch.utils.cpp_extension, which logs "No CUDA runtime is found, using
    CUDA_HOME=..." on a machine that has a CUDA toolkit but no GPU: beside the point in a profile, and it looked
    like an error in the middle of the run. Imported once here with that logger at ERROR (where CUDA runs, it
    says nothing of the kind: left as it is)."""
    if "torch.utils.cpp_extension" in sys.modules or torch.cuda.is_available():
        return
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        importlib.import_module("torch.utils.cpp_extension")
    finally:
        log.setLevel(level)


def compile_config(options: Sequence[str]):
    """The torch.compile settings a compiled variant is measured under: static shapes, and a recompile limit
    high enough that a fresh copy of the model per variant does not fall back to eager after a few variants
    (:func:`cnnperf.profile` resets Dynamo's caches at its end, so the user's own compiles start clean)."""
    if not any(OPTIONS[o].compiles for o in options):
        return contextlib.nullcontext()
    import torch._dynamo.config

    stack = contextlib.ExitStack()
    # Static shapes: a batch of another size (the sweep) compiles its own graph, as a training run at that
    # size would, instead of switching to a dynamic-shape graph that runs every size a little slower.
    stack.enter_context(torch._dynamo.config.patch(automatic_dynamic_shapes=False))
    limits = {k: 1024 for k in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                                "accumulated_cache_size_limit") if k in torch._dynamo.config._config}
    if limits:
        stack.enter_context(torch._dynamo.config.patch(**limits))
    return stack
