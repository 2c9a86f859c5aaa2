"""conv2d + bias (+ residual) + ReLU: argument checks, the custom op, its autograd, and the Triton launchers.

One path through the layers::

    cnnperf.functional.conv2d_bias_relu / cnnperf.nn.FusedConv2dBiasReLU
      -> conv2d_bias_relu() here: checks and normalises the arguments once, applies autocast
      -> torch.ops.cnnperf.conv2d_bias_relu (custom op: fake impl for torch.compile, autograd below)
           -> Triton kernels (kernels/conv_bias_relu.py) or cnnperf.reference, per cnnperf.backend

Torch's own ops (cnnperf.reference, with their autograd) instead of the custom op for what it has no formulas
for: empty problems, forward-mode AD and torch.func transforms; and in the backward, for gradients that will be
differentiated again (create_graph=True).

Layouts: the Triton path works in NHWC (channels_last). The forward saves input, weight and the output only
(no pre-activation), so the fused layer keeps no more activation memory than eager conv + ReLU; the ReLU mask
of the backward is ``output > 0``, with or without a residual (whose gradient is then grad_output there).

Memory format of the results, the same in the real and the fake implementation (torch.compile relies on it):
CUDA -> channels_last always; CPU -> torch's rule, channels_last when the input or the weight is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import threading
from typing import Iterator

import torch

from cnnperf import backend, perf_model, reference
from cnnperf.ops import conv_config_cache
from cnnperf.ops.conv_args import (
    check_residual,
    conv_arguments,
    functorch_active,
    has_tangent,
    memory_format,
    odd_residual,
    torch_format,
)
from cnnperf.perf_model import output_hw

OP = "conv2d_bias_relu"
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INT32_MAX = 2**31 - 1
_GRID_AXIS1_MAX = 65535  # CUDA's limit on a grid's y dimension: the kernels put groups (x stride phases) there


# ---------------------------------------------------------------------------------------------------------
# Public entry: checks once, then the custom op.
# ---------------------------------------------------------------------------------------------------------

def conv2d_bias_relu(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, residual=None):
    """``relu(conv2d(input, weight, bias, stride, padding, dilation, groups) + residual)`` in one fused op
    (``residual``: None, or a tensor added before the ReLU: a ResNet block's identity, its last conv's
    BatchNorm folded in).

    Accepts every argument form of :func:`torch.nn.functional.conv2d`: ints or pairs, ``padding='same'`` or
    ``'valid'``, unbatched (C, H, W) input, no bias, groups. Under :func:`torch.autocast` it computes in the
    autocast dtype, as ``nn.Conv2d`` does.

    Shapes: input (N, C_in, H, W) or (C_in, H, W); weight (C_out, C_in / groups, KH, KW); bias (C_out,);
    residual like the output (another shape broadcasts, another dtype promotes, as eager's add). Returns
    (N, C_out, OH, OW) (or (C_out, OH, OW)); channels_last memory on CUDA.
    """
    batched_input = input
    input, stride, padding, dilation, groups, unbatched = conv_arguments(OP, input, weight, bias, stride, padding,
                                                                         dilation, groups)
    shape = (input.shape[0], weight.shape[0], *output_hw(input.shape[2:], weight.shape[2:], stride, padding,
                                                         dilation))
    if residual is not None:
        residual, unbatched = check_residual(OP, residual, batched_input, shape, unbatched)

    device_type = input.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        input, weight = input.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None

    if input.numel() == 0 or weight.numel() == 0 or has_tangent(input, weight, bias, residual) \
            or functorch_active() or odd_residual(residual, shape, input.dtype):
        # Nothing to compute, and torch has its own rules for such shapes (zero input channels give zero output
        # channels; zero output channels are an error); or forward-mode AD or a torch.func transform (grad,
        # jacrev, vmap, ...), which the custom op has no formulas for; or a residual that broadcasts or
        # promotes: torch's ops, with their autograd, decide.
        out = reference.conv2d_bias_relu(input, weight, bias, stride, padding, dilation, groups, residual)
    else:
        out = torch.ops.cnnperf.conv2d_bias_relu(input, weight, bias, stride, padding, dilation, groups, residual)
    return out.squeeze(0) if unbatched else out


# ---------------------------------------------------------------------------------------------------------
# The custom ops (registered with torch.library so that torch.compile traces them without graph breaks).
# ---------------------------------------------------------------------------------------------------------

def unsupported(input, weight, output_numel: int, groups: int = 1, stride=(1, 1)) -> str | None:
    """Why the Triton kernels cannot take this call, or None when they can."""
    if input.dtype not in _TRITON_DTYPES:
        return f"dtype {input.dtype} is not covered by the Triton kernels (float16, bfloat16, float32 are)"
    if max(input.numel(), output_numel, weight.numel()) > _INT32_MAX:
        return (f"tensors over 2**31 elements use 64-bit indexing, which the kernels do not "
                f"(input {tuple(input.shape)}, output {output_numel} elements)")
    if groups * stride[0] * stride[1] > _GRID_AXIS1_MAX:
        return (f"groups={groups} x stride {tuple(stride)} is over the {_GRID_AXIS1_MAX} programs the kernels' "
                f"grid can hold on that axis")
    return None


@torch.library.custom_op("cnnperf::conv2d_bias_relu", mutates_args=())
def _conv2d_bias_relu_op(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         stride: list[int], padding: list[int], dilation: list[int], groups: int,
                         residual: torch.Tensor | None = None) -> torch.Tensor:
    oh, ow = output_hw(input.shape[2:], weight.shape[2:], stride, padding, dilation)
    fmt = memory_format(input, weight)
    path = backend.choose(OP, input.device.type,
                          unsupported(input, weight, input.shape[0] * weight.shape[0] * oh * ow, groups, stride))
    args = (input, weight, bias, stride, padding, dilation, groups, residual)
    if path == "triton" and input.device.type == "cuda" and backend.requested() == "auto":
        path = _auto_pick(("fwd", input.shape, weight.shape, bias is not None, input.dtype, tuple(stride),
                           tuple(padding), tuple(dilation), groups, residual is not None),
                          lambda: conv_bias_relu_forward(*args), lambda: _reference_forward(*args, fmt))
    out = conv_bias_relu_forward(*args) if path == "triton" else _reference_forward(*args, fmt)
    return out.contiguous(memory_format=fmt)


def _reference_forward(input, weight, bias, stride, padding, dilation, groups, residual, fmt):
    if fmt == torch.channels_last:  # cuDNN then writes channels_last directly, no copy afterwards
        input, weight = input.contiguous(memory_format=fmt), weight.contiguous(memory_format=fmt)
    return reference.conv2d_bias_relu(input, weight, bias, stride, padding, dilation, groups, residual)


@_conv2d_bias_relu_op.register_fake
def _(input, weight, bias, stride, padding, dilation, groups, residual=None):
    oh, ow = output_hw(input.shape[2:], weight.shape[2:], stride, padding, dilation)
    out = input.new_empty((input.shape[0], weight.shape[0], oh, ow))
    return out.contiguous(memory_format=memory_format(input, weight))


@torch.library.custom_op("cnnperf::conv2d_bias_relu_backward", mutates_args=())
def _conv2d_bias_relu_backward_op(grad_output: torch.Tensor, input: torch.Tensor, weight: torch.Tensor,
                                  output: torch.Tensor, stride: list[int], padding: list[int],
                                  dilation: list[int], groups: int,
                                  output_mask: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_input, grad_weight, grad_bias); an entry not asked for in ``output_mask`` is an empty tensor."""
    path = backend.choose(OP, input.device.type, unsupported(input, weight, output.numel(), groups, stride))
    args = (grad_output, input, weight, output, stride, padding, dilation, groups, output_mask)
    if path == "triton" and input.device.type == "cuda" and backend.requested() == "auto":
        path = _auto_pick(("bwd", input.shape, weight.shape, input.dtype, tuple(stride), tuple(padding),
                           tuple(dilation), groups, tuple(output_mask)),
                          lambda: conv_bias_relu_backward(*args), lambda: reference.conv2d_bias_relu_backward(*args))
    if path == "triton":
        grads = conv_bias_relu_backward(*args)
    else:
        grads = reference.conv2d_bias_relu_backward(*args)
    return _backward_results(grads, input, weight, output_mask)


def _backward_results(grads, input, weight, output_mask):
    """The three gradients as the custom op returns them: one tensor each, an empty one (its own: outputs of a
    custom op may not alias each other) for a gradient not asked for."""
    gi, gw, gb = grads
    gi = gi.contiguous(memory_format=memory_format(input, weight)) if output_mask[0] else input.new_empty((0,))
    gw = gw.contiguous(memory_format=torch_format(input, weight)) if output_mask[1] else input.new_empty((0,))
    gb = gb.contiguous() if output_mask[2] else input.new_empty((0,))
    return gi, gw, gb


@_conv2d_bias_relu_backward_op.register_fake
def _(grad_output, input, weight, output, stride, padding, dilation, groups, output_mask):
    grads = (input.new_empty(input.shape), weight.new_empty(weight.shape), weight.new_empty((weight.shape[0],)))
    return _backward_results(grads, input, weight, output_mask)


def _setup_context(ctx, inputs, output):
    input, weight, bias, stride, padding, dilation, groups, residual = inputs
    ctx.save_for_backward(input, weight, output)
    ctx.conv_args = (stride, padding, dilation, groups)
    ctx.has_bias = bias is not None
    ctx.has_residual = residual is not None
    # The backward runs on autograd's own thread for CUDA tensors, where this thread's backend.override and
    # pinned_configs are not seen: they travel with the node.
    ctx.backend = backend.requested()
    ctx.pinned = current_pinned_configs()


def _backward(ctx, grad_output):
    input, weight, output = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv_args
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
    grad_residual = None
    if ctx.has_residual and ctx.needs_input_grad[7]:
        # The residual's gradient is the ReLU's (its mask is output > 0 with or without the residual): written
        # once, and the conv's gradients take it (masking it again is a no-op).
        grad_residual = torch.where(output > 0, grad_output, 0)
        grad_output = grad_residual
    if not any(mask):
        return None, None, None, None, None, None, None, grad_residual
    if torch.is_grad_enabled():
        # create_graph=True: these gradients will be differentiated again (double backward, gradient
        # penalties). The backward op has no formula of its own; torch's ops computing the same do.
        gi, gw, gb = reference.conv2d_bias_relu_backward(
            grad_output, input, weight, output, stride, padding, dilation, groups, mask)
    else:
        with backend.override(ctx.backend), pinned_configs(**ctx.pinned):
            gi, gw, gb = torch.ops.cnnperf.conv2d_bias_relu_backward(
                grad_output, input, weight, output, stride, padding, dilation, groups, mask)
    return (gi if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None,
            None, None, None, None, grad_residual)


_conv2d_bias_relu_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------
# auto on a GPU: per shape, time the Triton kernels against cuDNN once and keep the faster.
# ---------------------------------------------------------------------------------------------------------

_auto_choice: dict[tuple, str] = {}


def auto_choices(input_shape, weight_shape, dtype: torch.dtype) -> dict[str, str]:
    """What ``auto`` chose on a GPU for convolutions of these shapes and dtype, by direction: ``{"fwd":
    "triton" | "reference", "bwd": ...}`` for the directions timed so far (any stride, padding and groups)."""
    return {key[0]: path for key, path in _auto_choice.items()
            if key[1] == tuple(input_shape) and key[2] == tuple(weight_shape) and dtype in key}


def _auto_pick(key: tuple, run_triton, run_reference, timer=None) -> str:
    """The faster of "triton" and "reference" for ``key``, measured on first use and cached.

    ``timer(fn) -> milliseconds`` defaults to ``triton.testing.do_bench`` (median). While a CUDA graph is
    being captured nothing can be timed, and the Triton path is taken; so it is under
    ``torch.use_deterministic_algorithms(True)``, where the choice must be the same every run.
    """
    if key in _auto_choice:
        return _auto_choice[key]
    if torch.are_deterministic_algorithms_enabled():
        return "triton"  # a timed choice can differ run to run; the kernels' results do not
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return "triton"
    if timer is None:
        import triton.testing

        def timer(fn):
            return triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median")
    t_triton, t_reference = timer(run_triton), timer(run_reference)
    _auto_choice[key] = "triton" if t_triton <= t_reference else "reference"
    return _auto_choice[key]


# ---------------------------------------------------------------------------------------------------------
# Triton launchers (NHWC). Shapes are checked above; inside, the values are trusted.
# ---------------------------------------------------------------------------------------------------------

def _kernels():
    from cnnperf.kernels import conv_bias_relu as K
    return K


_pinned = threading.local()
KINDS = ("fwd", "dgrad", "wgrad")


@contextlib.contextmanager
def pinned_configs(**configs) -> Iterator[None]:
    """Launch the conv kernels with fixed configs instead of autotuning, in this thread, inside the block.

    ``configs``: ``fwd=``, ``dgrad=``, ``wgrad=``, each a ``triton.Config`` or a dict of its constexprs
    (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M) with optional ``num_warps`` / ``num_stages``; a kind not named
    autotunes as usual. Tests use it to check every config of the lists, and on a GPU to compile one config per
    shape instead of all of them (autotuning a test's odd shapes would compile and time each config for each).
    """
    unknown = set(configs) - set(KINDS)
    if unknown:
        raise ValueError(f"pinned_configs: unknown kernel {sorted(unknown)}; the kernels are {', '.join(KINDS)}")
    previous = {kind: getattr(_pinned, kind, None) for kind in KINDS}
    for kind, config in configs.items():
        setattr(_pinned, kind, config)
    try:
        yield
    finally:
        for kind, config in previous.items():
            setattr(_pinned, kind, config)


def current_pinned_configs() -> dict:
    """This thread's :func:`pinned_configs`, by kernel (None: not pinned): a backward takes them along."""
    return {kind: getattr(_pinned, kind, None) for kind in KINDS}


def autotuning() -> bool:
    """Whether the conv kernels autotune (``CNNPERF_AUTOTUNE=1``): time every config of the list on the first
    call of each shape and keep the fastest. Off by default: the performance model's pick
    (:func:`cnnperf.perf_model.choose_config`) is deterministic, costs no GPU time, and works inside CUDA-graph
    capture, where nothing can be timed."""
    value = os.environ.get("CNNPERF_AUTOTUNE", "0").strip().lower()
    if value not in ("0", "1", "", "false", "true", "off", "on"):
        raise ValueError(f"CNNPERF_AUTOTUNE must be 0 or 1; got {value!r}")
    return value in ("1", "true", "on")


def config_list(kind: str, dtype: torch.dtype, variant: str = ""):
    """The config list kernel ``kind`` ("fwd", "dgrad", "wgrad") picks from for ``dtype`` (by its width).
    Variants of a kernel with a list or a pick of their own: "residual" (the forward adding a residual before
    its ReLU: its own list), "bn_dz" (dgrad / wgrad computing a BatchNorm's dz: their own pick)."""
    bits = 32 if dtype.itemsize == 4 else 16
    name = {"fwd": "FWD_CONFIGS", "dgrad": "DGRAD_CONFIGS", "wgrad": "WGRAD_CONFIGS"}[kind]
    if variant == "residual":
        name = "FWD_RESIDUAL_CONFIGS"
    return getattr(_kernels(), f"{name}_{bits}")


@functools.lru_cache(maxsize=4096)
def model_config(kind: str, conv: perf_model.Conv, dtype: torch.dtype, device_index: int,
                 variant: str = "") -> dict:
    """The config the performance model picks for ``kind`` (its ``variant``) on ``conv`` on this GPU (cached per
    shape); dgrad's and wgrad's are those of the backward :func:`model_backward` (or, ``bn_dz``,
    :func:`model_batch_norm_backward`) picks."""
    if kind == "fwd":
        return perf_model.choose_config(kind, conv, config_list(kind, dtype, variant), _gpu(device_index))
    if variant == "bn_dz":
        return model_batch_norm_backward(conv, dtype, device_index)[1][kind]
    return model_backward(conv, dtype, device_index)[1][kind]


@functools.lru_cache(maxsize=4096)
def model_backward(conv: perf_model.Conv, dtype: torch.dtype, device_index: int) -> tuple[bool, dict]:
    """(whether dgrad and wgrad apply the ReLU mask themselves, their configs):
    :func:`cnnperf.perf_model.choose_backward` on this GPU, cached per shape."""
    return perf_model.choose_backward(conv, config_list("dgrad", dtype), config_list("wgrad", dtype),
                                      _gpu(device_index))


@functools.lru_cache(maxsize=4096)
def model_batch_norm_backward(conv: perf_model.Conv, dtype: torch.dtype, device_index: int,
                              kinds: tuple[str, ...] = ("dgrad", "wgrad")) -> tuple[bool, dict]:
    """(whether the GEMMs ``kinds`` compute a BatchNorm's dz as they load grad_out and z, the configs of dgrad
    and wgrad): :func:`cnnperf.perf_model.choose_batch_norm_backward` on this GPU, cached per shape."""
    return perf_model.choose_batch_norm_backward(conv, config_list("dgrad", dtype), config_list("wgrad", dtype),
                                                 _gpu(device_index), kinds)


@functools.cache
def _gpu(index: int) -> perf_model.GPU:
    """The model's GPU for CUDA device ``index``: the Hopper figures from sm_90 up, else the Ampere ones, with
    the device's own SM count."""
    props = torch.cuda.get_device_properties(index)
    base = perf_model.GPUS[90 if props.major >= 9 else 80]
    # The device's own limits: an sm_86/sm_89 GPU has 99 KB of shared memory a block, not the A100's 163.
    smem = getattr(props, "shared_memory_per_block_optin", None) or base.smem_per_block
    smem_sm = getattr(props, "shared_memory_per_multiprocessor", None) or base.smem_per_sm
    return dataclasses.replace(base, name=props.name, sms=props.multi_processor_count, smem_per_block=smem,
                               smem_per_sm=smem_sm)


def _config(kind: str, conv: perf_model.Conv, dtype: torch.dtype, device: torch.device, variant: str = ""):
    """The config kernel ``kind`` launches with, or None to autotune, in this order: the pinned one
    (:func:`pinned_configs`); the interpreter's fixed one under ``TRITON_INTERPRET=1``; the one stored for this
    shape in ``CNNPERF_CONFIG_CACHE`` (:mod:`cnnperf.ops.conv_config_cache`); None (the autotuner) with
    ``CNNPERF_AUTOTUNE=1``, unless ``torch.use_deterministic_algorithms(True)`` asks for the same choice every
    run or a CUDA graph is being captured (the autotuner's timing runs cannot be); else the performance
    model's pick. ``variant``: see :func:`config_list`; stored and picked apart."""
    K = _kernels()
    config = getattr(_pinned, kind, None)
    if config is None and backend.interpret():
        config = {"fwd": K.INTERPRET_FWD_CONFIG, "dgrad": K.INTERPRET_DGRAD_CONFIG,
                  "wgrad": K.INTERPRET_WGRAD_CONFIG}[kind]
    if config is None and device.type == "cuda":
        file = conv_config_cache.path()
        if file is not None:
            config = conv_config_cache.lookup(file, _cache_entry(kind, conv, dtype, device, variant))
        if config is None and (not autotuning() or torch.are_deterministic_algorithms_enabled()
                               or torch.cuda.is_current_stream_capturing()):  # nothing can be timed in capture
            config = model_config(kind, conv, dtype, _device_index(device), variant)
    return config


def _cache_entry(kind: str, conv: perf_model.Conv, dtype: torch.dtype, device: torch.device,
                 variant: str = "") -> str:
    import triton

    from cnnperf import __version__

    precision = f" {_input_precision(dtype)}" if dtype.itemsize == 4 else ""
    return conv_config_cache.key(torch.cuda.get_device_name(device), f"triton {triton.__version__} cnnperf "
                                 f"{__version__}", f"{kind} {variant}".strip(), f"{dtype}{precision}", conv)


def launch_configs(input_shape, weight_shape, stride, padding, dilation, groups, dtype: torch.dtype,
                   has_bias: bool, device: torch.device) -> dict[str, str]:
    """What each conv kernel launches with for this problem, as labels (``128x128x64 w8 s3``, the format of
    :func:`cnnperf.perf_model.choose_config`'s configs), or ``"autotuned"``: benchmark records carry it, so the
    performance model can be compared with the configs that really ran."""
    conv = _problem(input_shape, weight_shape, stride, padding, dilation, groups, dtype, has_bias)
    out = {}
    for kind in KINDS:
        config = _config(kind, conv, dtype, device)
        out[kind] = "autotuned" if config is None else perf_model.config_label(perf_model.config_dict(config))
    return out


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _launch(kind: str, dtype: torch.dtype, config, grid, args: tuple, const: dict, conv=None, device=None,
            variant: str = "") -> None:
    """Launch kernel ``kind`` with ``config`` (see :func:`_config`), or autotuned for ``dtype`` (over its
    ``variant``'s list) when None; then the autotuner's winner goes to ``CNNPERF_CONFIG_CACHE`` if set (``conv``
    and ``device`` name the entry)."""
    K = _kernels()
    kernel, autotuned = {
        "fwd": (K._conv_bias_relu_fwd_kernel,
                lambda dtype: K.conv_bias_relu_fwd_autotuned(dtype, residual=variant == "residual")),
        "dgrad": (K._conv_dgrad_kernel, K.conv_dgrad_autotuned),
        "wgrad": (K._conv_wgrad_kernel, K.conv_wgrad_autotuned),
    }[kind]
    if config is not None:
        launch = {k: v for k, v in perf_model.config_dict(config).items() if k != "SPLIT_K"}  # const has it
        kernel[grid](*args, **const, **launch)
        return
    tuner = autotuned(dtype)
    tuner[grid](*args, **const)
    file = conv_config_cache.path()
    if file is not None and conv is not None and getattr(tuner, "best_config", None) is not None:
        conv_config_cache.record(file, _cache_entry(kind, conv, dtype, device, variant),
                                 perf_model.config_dict(tuner.best_config))


@functools.lru_cache(maxsize=None)
def _unused(device: torch.device) -> torch.Tensor:
    """A one-element fp32 tensor for a workspace pointer the kernel does not touch (SPLIT_K == 1)."""
    return torch.empty((1,), device=device, dtype=torch.float32)


def _split_k(config, out_elements: int, grid_axis1: int) -> int:
    """The K split a config asks for (fwd and dgrad; 1 when autotuning: the autotuner's configs have none),
    or 1 where the split's workspace would need 64-bit indices or its grid exceed CUDA's 65,535 on axis 1
    (a pinned or stored config; the model's own picks stay within both)."""
    split = perf_model.config_dict(config).get("SPLIT_K", 1) if config is not None else 1
    if split > 1 and (split * out_elements > _INT32_MAX or split * grid_axis1 > _GRID_AXIS1_MAX):
        return 1
    return split


def _split_k_sum(ws: torch.Tensor, bias: torch.Tensor, out: torch.Tensor, rows: int, cols: int, has_bias: bool,
                 relu: bool, weight_layout: tuple | None = None, residual: torch.Tensor | None = None) -> None:
    """out = relu?(sum of ws's slices in order + bias? + residual?) in out's dtype: out (and the residual) is
    (rows, cols) contiguous, or with ``weight_layout`` = (C_in_g, KW, strides of out) a (C_out, C_in_g, KH, KW)
    weight gradient, columns (kh, kw, ci)."""
    K = _kernels()
    cfg = K.SPLIT_K_SUM_CONFIG
    c_in_g, kw, s_co, s_ci, s_kh, s_kw = weight_layout if weight_layout is not None else (1, 1, cols, 0, 0, 0)
    K._split_k_sum_kernel[(_cdiv(rows, cfg["BLOCK_R"]), _cdiv(cols, cfg["BLOCK_C"]))](
        ws, bias, residual if residual is not None else ws, out, rows, cols, ws.shape[0], s_co, c_in_g, kw, s_ci,
        s_kh, s_kw, HAS_BIAS=has_bias, HAS_RESIDUAL=residual is not None, RELU=relu,
        WEIGHT=weight_layout is not None, BLOCK_R=cfg["BLOCK_R"],
        BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"])


def _even(kind: str, channels: int, config, dtype: torch.dtype, block: str, variant: str = "") -> bool:
    """Whether ``channels`` is a multiple of the ``block`` ("BLOCK_K", "BLOCK_N") that will launch: the
    config's, or every one of the list when the autotuner picks (so the constexpr holds for each)."""
    if config is not None:
        return channels % perf_model.config_dict(config)[block] == 0
    return all(channels % c.kwargs[block] == 0 for c in config_list(kind, dtype, variant))


def _problem(input_shape, weight_shape, stride, padding, dilation, groups, dtype, has_bias) -> perf_model.Conv:
    n, c_in, h, w = input_shape
    c_out, _, kh, kw = weight_shape
    return perf_model.Conv(n, c_in, h, w, c_out, kh, kw, tuple(stride), tuple(padding), tuple(dilation), groups,
                           dtype.itemsize, has_bias)


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    """``t`` with channel stride 1 and flattenable spatial dims (channels_last), copying only if needed."""
    return t.contiguous(memory_format=torch.channels_last)


def _weight_khwc(weight: torch.Tensor) -> torch.Tensor:
    """Weight as a contiguous (C_out, KH, KW, C_in/groups) tensor: the layout every kernel reads."""
    return weight.permute(0, 2, 3, 1).contiguous()


def _input_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 and not backend.interpret():
        return "tf32"  # the flag torch's own convolutions follow
    return "ieee"


def conv_bias_relu_forward(input, weight, bias, stride, padding, dilation, groups, residual=None) -> torch.Tensor:
    """Triton forward: implicit GEMM over NHWC, bias (and the residual) and ReLU in the epilogue. Returns
    channels_last output."""
    x = _nhwc(input)
    w = _weight_khwc(weight)
    n, c_in, h, wd = x.shape
    c_out, c_in_g, kh, kw = weight.shape
    oh, ow = output_hw((h, wd), (kh, kw), stride, padding, dilation)
    y = torch.empty((n, oh, ow, c_out), device=x.device, dtype=x.dtype)
    m = n * oh * ow
    c_out_g = c_out // groups
    b = bias.contiguous() if bias is not None else w  # the kernel reads bias[c] at c; never read without HAS_BIAS
    conv = _problem(x.shape, weight.shape, stride, padding, dilation, groups, x.dtype, bias is not None)
    variant = "residual" if residual is not None else ""
    config = _config("fwd", conv, x.dtype, x.device, variant)
    split_k = _split_k(config, m * c_out, groups)
    ws = torch.empty((split_k, m, c_out), device=x.device, dtype=torch.float32) if split_k > 1 else _unused(x.device)
    r = _nhwc(residual) if residual is not None else y  # (never read without HAS_RESIDUAL)
    args = (x, w, b, y, ws, _unused(x.device), r, n, h, wd, c_in, oh, ow, c_out, x.stride(0), x.stride(2),
            x.stride(3), stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], c_in_g, c_out_g)
    const = dict(SPLIT_K=split_k, KH=kh, KW=kw, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
                 STATS=False,
                 EVEN_K=_even("fwd", c_in_g, config, x.dtype, "BLOCK_K", variant),
                 EVEN_N=_even("fwd", c_out_g, config, x.dtype, "BLOCK_N", variant),
                 FOLD_C=perf_model.fold_channels(c_in_g),
                 INPUT_PRECISION=_input_precision(x.dtype))

    def grid(meta):
        return (_cdiv(m, meta["BLOCK_M"]) * _cdiv(c_out_g, meta["BLOCK_N"]), groups * split_k)

    _launch("fwd", x.dtype, config, grid, args, const, conv, x.device, variant)
    if split_k > 1:
        _split_k_sum(ws, b, y, m, c_out, bias is not None, relu=True, residual=r if residual is not None else None)
    return y.permute(0, 3, 1, 2)


def conv_bias_relu_backward(grad_output, input, weight, output, stride, padding, dilation, groups, output_mask):
    """Triton backward: dgrad and wgrad implicit GEMMs that apply the ReLU's mask as they load grad_output (and
    the wgrad sums the bias gradient as it goes); a separate mask pass only when they cannot read grad_output
    and output directly (:func:`_masks_in_gemms`)."""
    K = _kernels()
    n = input.shape[0]
    c_out = weight.shape[0]
    _, _, oh, ow = output.shape
    m = n * oh * ow
    conv = _problem(input.shape, weight.shape, stride, padding, dilation, groups, input.dtype, bool(output_mask[2]))
    grad_bias = None
    if _masks_in_gemms(grad_output, output, output_mask, conv):
        g, y = grad_output, output  # channels_last: (N*OH*OW, C_out) rows, read raw and masked by the GEMMs
    else:
        # g = grad_output * (output > 0), stored NHWC [M, C_out]; bias-gradient partial sums per row block.
        go = grad_output if _flat_spatial(grad_output) else _nhwc(grad_output)
        yy = output if _flat_spatial(output) else _nhwc(output)
        g, y = torch.empty((m, c_out), device=go.device, dtype=go.dtype), None
        cfg = K.MASK_CONFIG
        m_blocks = _cdiv(m, cfg["BLOCK_M"])
        partial_b = torch.empty((m_blocks, c_out) if output_mask[2] else (1,), device=go.device, dtype=torch.float32)
        K._relu_mask_bias_grad_kernel[(m_blocks, _cdiv(c_out, cfg["BLOCK_C"]))](
            go, yy, g, partial_b, m, c_out, oh * ow,
            go.stride(0), _pixel_stride(go), go.stride(1), yy.stride(0), _pixel_stride(yy), yy.stride(1),
            COMPUTE_BIAS=bool(output_mask[2]), BLOCK_M=cfg["BLOCK_M"], BLOCK_C=cfg["BLOCK_C"],
            num_warps=cfg["num_warps"])
        grad_bias = partial_b.sum(0).to(weight.dtype) if output_mask[2] else None
    grad_input, grad_weight, wgrad_bias = conv_gemm_backward(g, y, input, weight, oh, ow, stride, padding,
                                                             dilation, groups, output_mask, bias_in_wgrad=y is not None)
    return grad_input, grad_weight, grad_bias if wgrad_bias is None else wgrad_bias


def conv_gemm_backward(g, y, input, weight, oh, ow, stride, padding, dilation, groups, output_mask,
                       bias_in_wgrad: bool, chan: torch.Tensor | None = None, relu_mask: bool = True):
    """The convolution's gradients from the gradient of its output ``g`` (contiguous NHWC rows (N*OH*OW, C_out),
    or with ``y`` the raw grad_output whose ReLU mask ``y > 0`` the GEMMs apply as they load it, ``y`` of the
    same layout): (grad_input, grad_weight, grad_bias), None where not computed. The bias gradient is summed by
    the wgrad as it goes with ``bias_in_wgrad`` (and a weight gradient asked for), else left to the caller.

    With ``chan`` (a BatchNorm's fp32 (6, C_out) channel table, kernels/batch_norm_relu.py) ``y`` is z, the
    BatchNorm's input, and ``g`` the gradient of its ReLU's output (``relu_mask``: raw, the mask recomputed from
    z; else masked already): the GEMMs compute the BatchNorm's input gradient as they load them."""
    n, c_in, h, wd = input.shape
    c_out, c_in_g, kh, kw = weight.shape
    c_out_g = c_out // groups
    prec = _input_precision(input.dtype)
    conv = _problem(input.shape, weight.shape, stride, padding, dilation, groups, input.dtype, bool(output_mask[2]))
    bn = chan is not None
    variant = "bn_dz" if bn else ""
    mask_y = y is not None and (relu_mask or not bn)
    extra = dict(BN_GRAD=bn, MASK_Y=mask_y)
    chan = chan if bn else _unused(g.device)
    grad_bias = None

    w = _weight_khwc(weight) if output_mask[0] else None
    grad_input = grad_weight = None
    if output_mask[0]:
        dx = torch.empty((n, h, wd, c_in), device=g.device, dtype=input.dtype)
        steps = [s // math.gcd(s, d) for s, d in zip(stride, dilation)]  # between the taps of one stride phase
        config = _config("dgrad", conv, input.dtype, g.device, variant)
        pixels = n * h * wd
        split_k = _split_k(config, pixels * c_in, groups * stride[0] * stride[1])
        ws = (torch.empty((split_k, pixels, c_in), device=g.device, dtype=torch.float32) if split_k > 1
              else _unused(g.device))
        args = (g, y if y is not None else g, chan, w, dx, ws, n, h, wd, c_in, oh, ow, c_out,
                stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], c_in_g, c_out_g, *steps)
        const = dict(SPLIT_K=split_k, KH=kh, KW=kw,
                     EVEN_K=_even("dgrad", c_out_g, config, input.dtype, "BLOCK_K", variant),
                     INPUT_PRECISION=prec, **extra)
        phase0 = n * _cdiv(h, stride[0]) * _cdiv(wd, stride[1])  # the largest phase's pixels

        def grid(meta):
            return (_cdiv(phase0, meta["BLOCK_M"]) * _cdiv(c_in_g, meta["BLOCK_N"]),
                    groups * stride[0] * stride[1] * split_k)

        _launch("dgrad", input.dtype, config, grid, args, const, conv, g.device, variant)
        if split_k > 1:
            _split_k_sum(ws, dx, dx, pixels, c_in, False, relu=False)
        grad_input = dx.permute(0, 3, 1, 2)

    if output_mask[1]:
        x = _nhwc(input)
        config = _config("wgrad", conv, input.dtype, g.device, variant)
        split = _wgrad_split(conv, config, input.dtype, g.device, y is not None)
        partial_w = torch.empty((split, c_out, kh * kw * c_in_g), device=g.device, dtype=torch.float32)
        bias_grad = bias_in_wgrad and bool(output_mask[2])
        partial_b = (torch.empty((split, c_out), device=g.device, dtype=torch.float32) if bias_grad
                     else _unused(g.device))
        args = (g, y if y is not None else g, chan, x, partial_w, partial_b, n, h, wd, c_in, oh, ow, c_out,
                x.stride(0), x.stride(2), x.stride(3),
                stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], c_in_g, c_out_g, split)
        fold = perf_model.fold_channels(c_in_g)
        const = dict(KH=kh, KW=kw, FOLD_C=fold, BIAS_GRAD=bias_grad, INPUT_PRECISION=prec, **extra)

        def grid(meta):  # one tile per (kh, kw) and channel block, or per kh and (kw, c) block when folded
            cols, taps = (kw * fold, kh) if fold else (c_in_g, kh * kw)
            return (_cdiv(c_out_g, meta["BLOCK_M"]) * _cdiv(cols, meta["BLOCK_N"]) * taps, split, groups)

        _launch("wgrad", input.dtype, config, grid, args, const, conv, g.device, variant)
        # The slices' sum, cast and laid out as the custom op returns it (_backward_results), in one pass.
        grad_weight = torch.empty(weight.shape, device=g.device, dtype=weight.dtype,
                                  memory_format=torch_format(input, weight))
        _split_k_sum(partial_w, partial_w, grad_weight, c_out, kh * kw * c_in_g, False, relu=False,
                     weight_layout=(c_in_g, kw, *grad_weight.stride()))
        if bias_grad:
            grad_bias = partial_b.sum(0).to(weight.dtype)
    return grad_input, grad_weight, grad_bias


def _masks_in_gemms(grad_output: torch.Tensor, output: torch.Tensor, output_mask, conv: perf_model.Conv) -> bool:
    """Whether the dgrad and wgrad kernels apply the ReLU's mask themselves (and the wgrad sums the bias
    gradient): on a GPU where the model predicts that faster than the mask pass for this shape
    (:func:`model_backward`; always in the interpreter, to test it), with grad_output and output both dense
    channels_last (the rows the kernels index), and no bias gradient asked for without the weight's (it has no
    GEMM to ride on then)."""
    device = grad_output.device
    return ((device.type != "cuda" or model_backward(conv, grad_output.dtype, _device_index(device))[0])
            and grad_output.is_contiguous(memory_format=torch.channels_last)
            and output.is_contiguous(memory_format=torch.channels_last)
            and (output_mask[1] or not output_mask[2]))


def _flat_spatial(t: torch.Tensor) -> bool:
    """Whether (H, W) of a 4-D tensor can be read as one axis of stride :func:`_pixel_stride` (NCHW and NHWC can;
    with H or W of 1 any strides can)."""
    return t.shape[2] == 1 or t.shape[3] == 1 or t.stride(2) == t.shape[3] * t.stride(3)


def _pixel_stride(t: torch.Tensor) -> int:
    """The stride between pixels of a 4-D tensor whose (H, W) is flat: W's, or H's when W is 1 (a size-1 dim's
    stride can be anything: torch's layout checks ignore it, and ``contiguous`` keeps it)."""
    return t.stride(2) if t.shape[3] == 1 else t.stride(3)


def _wgrad_split(conv: perf_model.Conv, config, dtype: torch.dtype, device: torch.device, mask_y: bool) -> int:
    """How many slices the wgrad reduction over M = N*OH*OW is cut into (deterministic: summed afterwards):
    :func:`cnnperf.perf_model.wgrad_split` for the config that launches (the model's pick when autotuning,
    since the split is fixed before the autotuner chooses)."""
    if device.type != "cuda":
        return min(2, max(1, conv.n * conv.oh * conv.ow // 64))  # the interpreter: still exercise the split
    cfg = perf_model.config_dict(config if config is not None
                                 else model_config("wgrad", conv, dtype, _device_index(device)))
    return _model_wgrad_split(conv, tuple(sorted(cfg.items())), _device_index(device), mask_y)


@functools.lru_cache(maxsize=4096)
def _model_wgrad_split(conv: perf_model.Conv, cfg: tuple, device_index: int, mask_y: bool) -> int:
    """perf_model.wgrad_split, cached per shape and config: it weighs a dozen splits, too slow for every
    backward call."""
    return perf_model.wgrad_split(conv, dict(cfg), _gpu(device_index), mask_y)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
