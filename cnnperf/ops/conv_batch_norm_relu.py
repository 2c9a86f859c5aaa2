"""conv2d -> BatchNorm2d -> ReLU for training: argument checks, the custom ops, their autograd, the Triton launchers.

One path through the layers::

    cnnperf.functional.conv2d_batch_norm_relu / cnnperf.nn.FusedConv2dBatchNormReLU
      -> conv2d_batch_norm_relu() here: checks once, autocast, the BatchNorm's modes and running statistics
         - batch statistics (training, or no running statistics):
           torch.ops.cnnperf.conv2d_batch_norm_relu (custom op: fake impl for torch.compile, autograd below)
             -> Triton kernels (kernels/conv_bias_relu.py's forward with the statistics in its epilogue,
                kernels/batch_norm_relu.py) or cnnperf.reference, per cnnperf.backend
         - running statistics (eval): the BatchNorm folded into the convolution's weight and bias (torch ops,
           differentiable, so frozen-BN fine-tuning trains the conv, gamma and beta) -> conv2d_bias_relu

The custom op returns ``(output, z, mean, var)``: ``z = conv2d(...)`` is what the backward needs (the output is
not saved: the ReLU's mask is recomputed from z), mean and var the batch statistics (float32; float64 for float64
inputs) from which the running statistics are updated here, outside the op, as ``nn.BatchNorm2d`` does.

Saved for the backward, per element of the block's output: z only (its dtype's bytes), against eager's z (the
BatchNorm's input) and the ReLU's output; per channel: mean and var. So the fused block keeps no more
activation memory than eager Conv2d + BatchNorm2d + ReLU.
"""

from __future__ import annotations

import functools
import math

import torch

from cnnperf import backend, reference
from cnnperf.ops import conv_bias_relu as cbr
from cnnperf.ops.conv_args import (
    check_residual,
    conv_arguments,
    functorch_active,
    has_tangent,
    memory_format,
    odd_residual,
    torch_format,
)
from cnnperf.ops.conv_bias_relu import conv2d_bias_relu
from cnnperf.perf_model import output_hw

OP = "conv2d_batch_norm_relu"


# ---------------------------------------------------------------------------------------------------------
# Public entry.
# ---------------------------------------------------------------------------------------------------------

def conv2d_batch_norm_relu(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
                           running_mean=None, running_var=None, bn_weight=None, bn_bias=None, training=False,
                           momentum=0.1, eps=1e-5, residual=None):
    """``relu(batch_norm(conv2d(input, weight, bias, stride, padding, dilation, groups), running_mean,
    running_var, bn_weight, bn_bias, training, momentum, eps) + residual)`` as one fused op (``residual``: None,
    or a tensor of the output's shape added before the ReLU, a ResNet block's identity).

    The convolution's arguments are those of :func:`torch.nn.functional.conv2d`, the BatchNorm's (keyword-only)
    those of :func:`torch.nn.functional.batch_norm`, with the same meaning: with ``training=True`` the output is
    normalised with the batch's statistics (biased variance) and ``running_mean`` / ``running_var``, if given,
    are updated in place with ``momentum`` (unbiased variance); with ``training=False`` the running statistics
    normalise (folded into the convolution's weight and bias, in float32). Under :func:`torch.autocast` the
    convolution computes in the autocast dtype and the statistics in float32.

    Shapes: input (N, C_in, H, W) or (C_in, H, W); weight (C_out, C_in / groups, KH, KW); bias and the
    BatchNorm's tensors (C_out,); residual like the output. Returns (N, C_out, OH, OW) (or (C_out, OH, OW));
    channels_last on CUDA.
    """
    batched_input = input
    input, stride, padding, dilation, groups, unbatched = conv_arguments(OP, input, weight, bias, stride, padding,
                                                                         dilation, groups)
    _check_batch_norm(weight, running_mean, running_var, bn_weight, bn_bias, momentum, eps)
    oh, ow = output_hw(input.shape[2:], weight.shape[2:], stride, padding, dilation)
    if residual is not None:
        residual, unbatched = check_residual(OP, residual, batched_input, (input.shape[0], weight.shape[0], oh, ow),
                                             unbatched)
    if not training:
        if running_mean is None:
            raise ValueError(f"{OP}: training=False normalises with the running statistics, but running_mean and "
                             f"running_var are None (pass training=True to use the batch's statistics)")
        # Folded from the weights as they are (float32 parameters under autocast): conv2d_bias_relu then computes
        # in the autocast dtype.
        out = _running_statistics(input, weight, bias, stride, padding, dilation, groups, running_mean,
                                  running_var, bn_weight, bn_bias, residual, eps)
        return out.squeeze(0) if unbatched else out
    device_type = input.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        input, weight = input.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    odd = odd_residual(residual, (input.shape[0], weight.shape[0], oh, ow), input.dtype)
    if input.numel() == 0 or weight.numel() == 0 or odd or functorch_active() \
            or has_tangent(input, weight, bias, bn_weight, bn_bias, residual):
        # As conv2d_bias_relu: torch's ops, with their own rules and autograd, for what the custom op has no
        # formulas for (empty problems, forward-mode AD, torch.func transforms).
        z = torch.nn.functional.conv2d(input, weight, bias, stride, padding, dilation, groups)
        out = torch.nn.functional.batch_norm(z, running_mean, running_var, bn_weight, bn_bias, True, momentum, eps)
        out = torch.relu(out if residual is None else out + residual)
    else:
        _check_batch_size(input.shape[0], weight.shape[0], oh, ow)
        out, _, mean, var = torch.ops.cnnperf.conv2d_batch_norm_relu(
            input, weight, bias, bn_weight, bn_bias, residual, float(eps), stride, padding, dilation, groups)
        if running_mean is not None:
            _update_running_statistics(running_mean, running_var, mean, var, input.shape[0] * oh * ow, momentum)
    return out.squeeze(0) if unbatched else out


def _check_batch_norm(weight, running_mean, running_var, bn_weight, bn_bias, momentum, eps):
    channels = weight.shape[0]
    named = (("running_mean", running_mean), ("running_var", running_var), ("bn_weight", bn_weight),
             ("bn_bias", bn_bias))
    for name, t in named:
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{OP}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
        if t.shape != (channels,):
            raise ValueError(f"{OP}: {name} must have shape ({channels},), one value per output channel of weight "
                             f"{tuple(weight.shape)}; got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{OP}: {name} must be a floating-point tensor, got {t.dtype}")
        if t.device != weight.device:
            raise RuntimeError(f"{OP}: {name} is on {t.device} but weight {tuple(weight.shape)} on {weight.device}")
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{OP}: running_mean and running_var go together; got "
                         f"running_mean {'None' if running_mean is None else 'a tensor'} and running_var "
                         f"{'None' if running_var is None else 'a tensor'}")
    # Under torch.compile the layer's cumulative momentum (momentum=None: 1 / num_batches_tracked) is a symbolic
    # float that cannot be checked without a graph break (FusedConv2dBatchNormReLU computes it from its counter).
    numbers = (("eps", eps),) if torch.compiler.is_compiling() else (("momentum", momentum), ("eps", eps))
    for name, value in numbers:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{OP}: {name} must be a finite number, got {value!r}")
    if eps < 0:
        raise ValueError(f"{OP}: eps must be >= 0, got {eps}")


def _check_batch_size(n: int, channels: int, oh: int, ow: int) -> None:
    """BatchNorm's own error for one value per channel (torch.nn.functional._verify_batch_size)."""
    if n * oh * ow == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                         f"{torch.Size((n, channels, oh, ow))}")


@torch.no_grad()
def _update_running_statistics(running_mean, running_var, mean, var, count: int, momentum: float) -> None:
    """running = (1 - momentum) * running + momentum * batch, with the unbiased batch variance (ATen's rule)."""
    unbiased = var * (count / (count - 1))
    running_mean.copy_(running_mean * (1 - momentum) + mean * momentum)
    running_var.copy_(running_var * (1 - momentum) + unbiased * momentum)


def _running_statistics(input, weight, bias, stride, padding, dilation, groups, running_mean, running_var,
                        bn_weight, bn_bias, residual, eps):
    """Eval mode: the BatchNorm folded into the convolution (in float32, or float64 for float64 weights) and
    one conv2d_bias_relu (adding the residual before its ReLU). Differentiable in weight, bias, bn_weight,
    bn_bias (and the residual)."""
    folded_weight, folded_bias = reference.fold_batch_norm(weight, bias, running_mean, running_var, bn_weight,
                                                           bn_bias, eps, reference.statistics_dtype(weight.dtype))
    folded_weight, folded_bias = folded_weight.to(weight.dtype), folded_bias.to(weight.dtype)
    return conv2d_bias_relu(input, folded_weight, folded_bias, stride, padding, dilation, groups, residual=residual)


# ---------------------------------------------------------------------------------------------------------
# The custom ops.
# ---------------------------------------------------------------------------------------------------------

@torch.library.custom_op("cnnperf::conv2d_batch_norm_relu", mutates_args=())
def _conv2d_batch_norm_relu_op(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                               bn_weight: torch.Tensor | None, bn_bias: torch.Tensor | None,
                               residual: torch.Tensor | None, eps: float, stride: list[int], padding: list[int],
                               dilation: list[int],
                               groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    oh, ow = output_hw(input.shape[2:], weight.shape[2:], stride, padding, dilation)
    fmt = memory_format(input, weight)
    path = backend.choose(OP, input.device.type,
                          cbr.unsupported(input, weight, input.shape[0] * weight.shape[0] * oh * ow, groups, stride))
    args = (input, weight, bias, bn_weight, bn_bias, residual, eps, stride, padding, dilation, groups)
    if path == "triton" and input.device.type == "cuda" and backend.requested() == "auto":
        path = cbr._auto_pick(("bn_fwd", input.shape, weight.shape, bias is not None, input.dtype, tuple(stride),
                               tuple(padding), tuple(dilation), groups, residual is not None),
                              lambda: conv_batch_norm_relu_forward(*args), lambda: _reference_forward(*args, fmt))
    out, z, mean, var = (conv_batch_norm_relu_forward(*args) if path == "triton" else _reference_forward(*args, fmt))
    return out.contiguous(memory_format=fmt), z.contiguous(memory_format=fmt), mean, var


def _reference_forward(input, weight, bias, bn_weight, bn_bias, residual, eps, stride, padding, dilation, groups,
                       fmt):
    if fmt == torch.channels_last:  # cuDNN then writes channels_last directly
        input, weight = input.contiguous(memory_format=fmt), weight.contiguous(memory_format=fmt)
    return reference.conv2d_batch_norm_relu(input, weight, bias, bn_weight, bn_bias, residual, eps, stride, padding,
                                            dilation, groups)


@_conv2d_batch_norm_relu_op.register_fake
def _(input, weight, bias, bn_weight, bn_bias, residual, eps, stride, padding, dilation, groups):
    oh, ow = output_hw(input.shape[2:], weight.shape[2:], stride, padding, dilation)
    fmt = memory_format(input, weight)
    shape = (input.shape[0], weight.shape[0], oh, ow)
    stats = input.new_empty((weight.shape[0],), dtype=reference.statistics_dtype(input.dtype))
    return (input.new_empty(shape).contiguous(memory_format=fmt), input.new_empty(shape).contiguous(memory_format=fmt),
            stats, torch.empty_like(stats))


@torch.library.custom_op("cnnperf::conv2d_batch_norm_relu_backward", mutates_args=())
def _conv2d_batch_norm_relu_backward_op(
        grad_output: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, z: torch.Tensor, mean: torch.Tensor,
        var: torch.Tensor, bn_weight: torch.Tensor | None, bn_bias: torch.Tensor | None,
        output: torch.Tensor | None, eps: float,
        stride: list[int], padding: list[int], dilation: list[int], groups: int,
        output_mask: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                          torch.Tensor]:
    """(grad_input, grad_weight, grad_bias, grad_bn_weight, grad_bn_bias, grad_residual); an entry not asked for
    in ``output_mask`` is an empty tensor. ``output``: the forward's output where it added a residual (the ReLU's
    mask is ``output > 0`` then), else None."""
    path = backend.choose(OP, input.device.type, cbr.unsupported(input, weight, z.numel(), groups, stride))
    args = (grad_output, input, weight, z, mean, var, bn_weight, bn_bias, output, eps, stride, padding, dilation,
            groups, output_mask)
    if path == "triton" and input.device.type == "cuda" and backend.requested() == "auto":
        path = cbr._auto_pick(("bn_bwd", input.shape, weight.shape, input.dtype, tuple(stride), tuple(padding),
                               tuple(dilation), groups, tuple(output_mask)),
                              lambda: conv_batch_norm_relu_backward(*args),
                              lambda: reference.conv2d_batch_norm_relu_backward(*args))
    if path == "triton":
        grads = conv_batch_norm_relu_backward(*args)
    else:
        grads = reference.conv2d_batch_norm_relu_backward(*args)
    return _backward_results(grads, input, weight, output_mask)


def _backward_results(grads, input, weight, output_mask):
    gi, gw, gb, g_gamma, g_beta, g_residual = grads
    empty = input.new_empty((0,))
    fmt = memory_format(input, weight)
    return (gi.contiguous(memory_format=fmt) if output_mask[0] else empty,
            gw.contiguous(memory_format=torch_format(input, weight)) if output_mask[1] else empty.clone(),
            gb.contiguous() if output_mask[2] else empty.clone(),
            g_gamma.contiguous() if output_mask[3] else empty.clone(),
            g_beta.contiguous() if output_mask[4] else empty.clone(),
            g_residual.contiguous(memory_format=fmt) if output_mask[5] else empty.clone())


@_conv2d_batch_norm_relu_backward_op.register_fake
def _(grad_output, input, weight, z, mean, var, bn_weight, bn_bias, output, eps, stride, padding, dilation,
      groups, output_mask):
    channels = (weight.shape[0],)
    grads = (input.new_empty(input.shape), weight.new_empty(weight.shape), weight.new_empty(channels),
             bn_weight.new_empty(channels) if bn_weight is not None else None,
             bn_bias.new_empty(channels) if bn_bias is not None else None,
             output.new_empty(output.shape) if output is not None else None)
    return _backward_results(grads, input, weight, output_mask)


def _setup_context(ctx, inputs, output):
    input, weight, bias, bn_weight, bn_bias, residual, eps, stride, padding, dilation, groups = inputs
    out, z, mean, var = output
    ctx.mark_non_differentiable(z, mean, var)
    # With a residual, the ReLU's mask is the output's (out > 0): the next layer keeps the output anyway, where
    # the residual (a downsampled identity) would be kept for this alone.
    ctx.save_for_backward(input, weight, z, mean, var, bn_weight, bn_bias, out if residual is not None else None,
                          bias)
    ctx.args = (eps, stride, padding, dilation, groups)
    ctx.has = (bias is not None, bn_weight is not None, bn_bias is not None, residual is not None)
    ctx.backend = backend.requested()  # the backward may run on autograd's thread (see conv_bias_relu)
    ctx.pinned = cbr.current_pinned_configs()


def _backward(ctx, grad_output, _grad_z, _grad_mean, _grad_var):
    input, weight, z, mean, var, bn_weight, bn_bias, out, bias = ctx.saved_tensors
    eps, stride, padding, dilation, groups = ctx.args
    needs = ctx.needs_input_grad
    mask = [needs[0], needs[1], ctx.has[0] and needs[2], ctx.has[1] and needs[3], ctx.has[2] and needs[4],
            ctx.has[3] and needs[5]]
    nothing = (None,) * 5
    if not any(mask):
        return (*nothing, None, *nothing)
    args = (grad_output, input, weight, z, mean, var, bn_weight, bn_bias, out, eps, stride, padding, dilation,
            groups, mask)
    if torch.is_grad_enabled():
        grads = _recomputed_grads(grad_output, (input, weight, bias, bn_weight, bn_bias), out, eps, stride, padding,
                                  dilation, groups, mask)
    else:
        with backend.override(ctx.backend), cbr.pinned_configs(**ctx.pinned):
            grads = torch.ops.cnnperf.conv2d_batch_norm_relu_backward(*args)
    return (*(g if m else None for g, m in zip(grads, mask)), *nothing)


def _recomputed_grads(grad_output, inputs, out, eps, stride, padding, dilation, groups, mask):
    """create_graph=True (double backward, gradient penalties): the gradients will be differentiated again, also
    through z and the batch statistics, which the op's outputs do not carry. So the forward runs again with
    torch's ops from the saved inputs, and its gradients are taken with a graph of their own. The ReLU's mask is
    a constant there (its derivative is 0 almost everywhere): from the output where a residual was added (``out``),
    else from the recomputed pre-activation; the residual's gradient is grad_output under the mask."""
    input, weight, bias, bn_weight, bn_bias = inputs
    z = torch.nn.functional.conv2d(input, weight, bias, stride, padding, dilation, groups)
    zs = z.to(reference.statistics_dtype(z.dtype))
    pre = torch.nn.functional.batch_norm(zs, None, None, bn_weight, bn_bias, True, 0.0, eps)
    positive = (out if out is not None else pre.detach()) > 0
    g = torch.where(positive, grad_output, 0)
    wanted = [t for t, m in zip(inputs, mask) if m]
    grads = iter(torch.autograd.grad(pre, wanted, g.to(pre.dtype), create_graph=True) if wanted else ())
    return [next(grads) if m else None for m in mask[:5]] + [g if mask[5] else None]


_conv2d_batch_norm_relu_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------
# Triton launchers (NHWC). Shapes are checked above; inside, the values are trusted.
# ---------------------------------------------------------------------------------------------------------

def _kernels():
    from cnnperf.kernels import batch_norm_relu as K
    return K


def _pass_config(device: torch.device) -> dict:
    K = _kernels()
    return K.INTERPRET_CONFIG if device.type != "cuda" else K.CONFIG


def _finalize_config(device: torch.device) -> dict:
    K = _kernels()
    return K.INTERPRET_FINALIZE_CONFIG if device.type != "cuda" else K.FINALIZE_CONFIG


def _channel_table(stats, mean, var, bn_weight, bn_bias, eps: float, rows: int, tile_m: int) -> torch.Tensor:
    """The kernels' fp32 (6, C) table (mean, invstd, scale = gamma * invstd, beta (0 without), and the gradient's
    b and k as zeros), one launch. With ``stats`` (the conv kernel's (2, tiles, C) per-tile statistics of
    ``tile_m`` rows each, ``rows`` in all) it also writes the batch's mean and biased variance into ``mean`` and
    ``var``; without, it reads them."""
    K, cfg = _kernels(), _finalize_config(mean.device)
    c = mean.numel()
    chan = torch.empty((6, c), device=mean.device, dtype=torch.float32)
    unused = chan  # (never read without HAS_WEIGHT / HAS_BIAS / FROM_TILES)
    with backend.quiet_interpreter():
        K._batch_norm_statistics_kernel[(-(-c // cfg["BLOCK_C"]),)](
            stats if stats is not None else unused, mean, var,
            bn_weight if bn_weight is not None else unused, bn_bias if bn_bias is not None else unused, chan,
            rows, c, stats.shape[1] if stats is not None else 0, tile_m, eps, FROM_TILES=stats is not None,
            HAS_WEIGHT=bn_weight is not None, HAS_BIAS=bn_bias is not None, BLOCK_T=cfg["BLOCK_T"],
            BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"])
    return chan


def conv_batch_norm_relu_forward(input, weight, bias, bn_weight, bn_bias, residual, eps, stride, padding, dilation,
                                 groups):
    """Triton forward: the conv kernel stores z and its per-tile statistics (``STATS``), one small kernel combines
    the tiles (Chan's formula, float64 on (tiles, C) values) into the mean, the variance and the channel table,
    and one pass writes relu((z - mean) * scale + beta (+ residual)). Returns (output, z, mean, var),
    channels_last, the statistics in float32."""
    x = cbr._nhwc(input)
    w = cbr._weight_khwc(weight)
    n, c_in, h, wd = x.shape
    c_out, c_in_g, kh, kw = weight.shape
    oh, ow = output_hw((h, wd), (kh, kw), stride, padding, dilation)
    m = n * oh * ow
    c_out_g = c_out // groups
    conv = cbr._problem(x.shape, weight.shape, stride, padding, dilation, groups, x.dtype, bias is not None)
    config = _stats_config(conv, x.dtype, x.device)
    block_m = cbr.perf_model.config_dict(config)["BLOCK_M"]
    tiles_m = -(-m // block_m)
    z = torch.empty((n, oh, ow, c_out), device=x.device, dtype=x.dtype)
    stats = torch.empty((2, tiles_m, c_out), device=x.device, dtype=torch.float32)
    b = bias.contiguous() if bias is not None else w
    args = (x, w, b, z, cbr._unused(x.device), stats, z, n, h, wd, c_in, oh, ow, c_out, x.stride(0), x.stride(2),
            x.stride(3), stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], c_in_g, c_out_g)
    const = dict(SPLIT_K=1, KH=kh, KW=kw, HAS_BIAS=bias is not None, HAS_RESIDUAL=False, STATS=True,
                 EVEN_K=cbr._even("fwd", c_in_g, config, x.dtype, "BLOCK_K"),
                 EVEN_N=cbr._even("fwd", c_out_g, config, x.dtype, "BLOCK_N"),
                 FOLD_C=cbr.perf_model.fold_channels(c_in_g), INPUT_PRECISION=cbr._input_precision(x.dtype))

    def grid(meta):
        return (tiles_m * -(-c_out_g // meta["BLOCK_N"]), groups)

    with backend.quiet_interpreter():
        cbr._launch("fwd", x.dtype, config, grid, args, const, conv, x.device)
    mean = torch.empty(c_out, device=x.device, dtype=torch.float32)
    var = torch.empty_like(mean)
    chan = _channel_table(stats, mean, var, bn_weight, bn_bias, eps, m, block_m)
    y = torch.empty_like(z)
    res = cbr._nhwc(residual) if residual is not None else z  # (never read without HAS_RESIDUAL)
    K, cfg = _kernels(), _pass_config(x.device)
    with backend.quiet_interpreter():
        K._batch_norm_relu_kernel[(-(-m // cfg["BLOCK_M"]), -(-c_out // cfg["BLOCK_C"]))](
            z, res, chan, y, m, c_out, HAS_RESIDUAL=residual is not None, BLOCK_M=cfg["BLOCK_M"],
            BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"])
    return y.permute(0, 3, 1, 2), z.permute(0, 3, 1, 2), mean, var


def _stats_config(conv, dtype: torch.dtype, device: torch.device):
    """The forward's config with the statistics epilogue: the pinned one (``conv_bias_relu.pinned_configs``), the
    interpreter's, else the performance model's pick from the STATS list (kernels/conv_bias_relu.py). Never the
    autotuner's or a stored one: the statistics need the row tile before the launch, and that list's own
    configs (the epilogue needs registers); no K split either (its epilogue is the split-K sum's)."""
    pinned = cbr.current_pinned_configs()["fwd"]
    if pinned is not None:
        return pinned
    if backend.interpret():
        return cbr._kernels().INTERPRET_FWD_CONFIG
    return _model_stats_config(conv, dtype, cbr._device_index(device))


@functools.lru_cache(maxsize=4096)
def _model_stats_config(conv, dtype: torch.dtype, device_index: int) -> dict:
    K = cbr._kernels()
    configs = K.FWD_STATS_CONFIGS_32 if dtype.itemsize == 4 else K.FWD_STATS_CONFIGS_16
    return cbr.perf_model.choose_config("fwd", conv, configs, cbr._gpu(device_index))


def conv_batch_norm_relu_backward(grad_output, input, weight, z, mean, var, bn_weight, bn_bias, output, eps,
                                  stride, padding, dilation, groups, output_mask):
    """Triton backward: one pass sums g and g * xhat per row block and channel (with a residual, ``output``
    given, the mask is ``output > 0`` and it also writes g, the residual's gradient), one small kernel adds the
    blocks up (the BatchNorm's beta and gamma gradients) and writes b and k; then the convolution's dgrad and
    wgrad GEMMs take dz, the BatchNorm's input gradient: computed as they load grad_out (or g) and z where
    :func:`_dz_in_gemms` says so, else written by one more pass (and the wgrad sums the conv bias's gradient
    from it as it goes)."""
    K, cfg = _kernels(), _pass_config(z.device)
    n, c, oh, ow = z.shape
    m = n * oh * ow
    go = grad_output if cbr._flat_spatial(grad_output) else cbr._nhwc(grad_output)
    zz = cbr._nhwc(z)
    grid = (-(-m // cfg["BLOCK_M"]), -(-c // cfg["BLOCK_C"]))
    strides = (go.stride(0), cbr._pixel_stride(go), go.stride(1))
    chan = _channel_table(None, mean.contiguous(), var.contiguous(), bn_weight, bn_bias, eps, m, 0)
    partial = torch.empty((2, grid[0], c), device=z.device, dtype=torch.float32)
    has_residual = output is not None
    y = cbr._nhwc(output) if has_residual else zz  # (never read without HAS_RESIDUAL)
    g = torch.empty((n, oh, ow, c), device=z.device, dtype=output.dtype) if has_residual else zz
    launch = dict(HAS_RESIDUAL=has_residual, BLOCK_M=cfg["BLOCK_M"], BLOCK_C=cfg["BLOCK_C"],
                  num_warps=cfg["num_warps"])
    with backend.quiet_interpreter():
        K._batch_norm_relu_grad_sums_kernel[grid](go, zz, y, chan, partial, g, m, c, oh * ow, *strides, **launch)
    sums = torch.empty((2, c), device=z.device, dtype=torch.float32)
    fin = _finalize_config(z.device)
    grad_input = grad_weight = grad_bias = None
    with backend.quiet_interpreter():
        K._batch_norm_grad_coefficients_kernel[(-(-c // fin["BLOCK_C"]),)](
            partial, chan, sums, m, c, grid[0], BLOCK_T=fin["BLOCK_T"], BLOCK_C=fin["BLOCK_C"],
            num_warps=fin["num_warps"])
        sum_g, sum_gx = sums
        conv_args = (input, weight, oh, ow, stride, padding, dilation, groups, output_mask[:3])
        if not any(output_mask[:3]):
            pass  # a frozen convolution: the BatchNorm's parameters only
        elif _dz_in_gemms(has_residual or grad_output.is_contiguous(memory_format=torch.channels_last), input,
                          weight, stride, padding, dilation, groups, output_mask):
            # The GEMMs read grad_out (masked as the sums pass did) or g, and z: no dz in memory.
            grad_input, grad_weight, _ = cbr.conv_gemm_backward(
                g if has_residual else grad_output, zz, *conv_args, bias_in_wgrad=False, chan=chan,
                relu_mask=not has_residual)
        else:
            dz = torch.empty((m, c), device=z.device, dtype=z.dtype)
            K._batch_norm_relu_grad_kernel[grid](go, zz, g, chan, dz, m, c, oh * ow, *strides, **launch)
            grad_input, grad_weight, grad_bias = cbr.conv_gemm_backward(
                dz, None, *conv_args, bias_in_wgrad=bool(output_mask[1]))
            if output_mask[2] and grad_bias is None:
                grad_bias = dz.float().sum(0).to(weight.dtype)
    # Copies: the two sums are views of one tensor, and a custom op's outputs may not alias each other.
    grad_gamma = sum_gx.to(bn_weight.dtype, copy=True) if output_mask[3] else None
    grad_beta = sum_g.to(bn_bias.dtype, copy=True) if output_mask[4] else None
    grad_residual = g.permute(0, 3, 1, 2) if output_mask[5] else None
    return grad_input, grad_weight, grad_bias, grad_gamma, grad_beta, grad_residual


def _dz_in_gemms(rows_ready: bool, input, weight, stride, padding, dilation, groups, output_mask) -> bool:
    """Whether the dgrad and wgrad GEMMs compute the BatchNorm's input gradient dz as they load their operand
    (saving the dz pass's write and two reads for one more tile read in each GEMM's K loop): with their operand
    in NHWC rows (``rows_ready``: g, or a dense channels_last grad_out), no conv bias gradient asked for (the
    wgrad's bias MMA beside the dz arithmetic spills in fp32, `cnnperf audit`; and a conv bias before a
    BatchNorm is rare: torchvision's convs have none), and on a GPU where the model predicts it faster for this
    shape (:func:`cnnperf.ops.conv_bias_relu.model_batch_norm_backward`); always where those hold in the
    interpreter, to test it."""
    if not rows_ready or output_mask[2]:
        return False
    if input.device.type != "cuda":
        return True
    conv = cbr._problem(input.shape, weight.shape, stride, padding, dilation, groups, input.dtype, False)
    kinds = tuple(kind for kind, wanted in zip(("dgrad", "wgrad"), output_mask) if wanted)
    return cbr.model_batch_norm_backward(conv, input.dtype, cbr._device_index(input.device), kinds)[0]
