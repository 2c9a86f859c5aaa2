"""Reference PyTorch ops: the CPU path of every cnnperf op and the float64 oracle of every test.

Each function here computes exactly what the matching Triton op computes, with plain PyTorch, in the dtype of
its inputs. Tests call them on inputs upcast to float64 and compare the kernels against the result with the
tolerance table in :mod:`cnnperf.testing`.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F


def conv2d_bias_relu(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1,
                     residual=None) -> torch.Tensor:
    """``relu(conv2d(input, weight, bias, ...) (+ residual))``, with every argument form ``F.conv2d`` takes.

    input: (N, C_in, H, W) or (C_in, H, W); weight: (C_out, C_in / groups, KH, KW); bias: (C_out,) or None;
    residual: None or a tensor added before the ReLU (broadcast and promoted as ``+`` does).
    Returns (N, C_out, OH, OW) in the dtype of ``input`` (or the promoted one).
    """
    z = F.conv2d(input, weight, bias, stride, padding, dilation, groups)
    return F.relu(z if residual is None else z + residual)


def conv2d_bias_relu_backward(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    weight: torch.Tensor,
    output: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    output_mask: Sequence[bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of :func:`conv2d_bias_relu` from its saved ``output`` (no pre-activation is kept).

    The ReLU mask is ``output > 0``; ``output_mask`` says which of (grad_input, grad_weight, grad_bias) to
    compute, the others are returned as None.
    """
    grad_pre = torch.where(output > 0, grad_output, 0)  # as torch's threshold_backward
    bias_sizes = [weight.shape[0]] if output_mask[2] else None
    grad_input, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
        grad_pre, input, weight, bias_sizes,
        list(stride), list(padding), list(dilation), False, [0, 0], groups,
        [bool(output_mask[0]), bool(output_mask[1]), bool(output_mask[2])],
    )
    return grad_input, grad_weight, grad_bias


def statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of batch-norm statistics for activations in ``dtype``: float32, float64 for float64 (as ATen's
    batch norm accumulates)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _channel(v: torch.Tensor) -> torch.Tensor:
    return v[:, None, None]


def batch_norm_scale(var: torch.Tensor, bn_weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """gamma / sqrt(var + eps) per channel, in ``var``'s dtype (gamma is 1 without ``bn_weight``)."""
    invstd = torch.rsqrt(var + eps)
    return invstd if bn_weight is None else invstd * bn_weight.to(var.dtype)


def fold_batch_norm(weight, bias, running_mean, running_var, bn_weight, bn_bias, eps: float,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias of a convolution followed by an eval-mode BatchNorm, as one convolution:
    weight * s and (bias - running_mean) * s + beta, with s = gamma / sqrt(running_var + eps), computed in
    ``dtype`` (differentiable; ``bias``, ``bn_weight``, ``bn_bias`` may be None: 0, 1, 0)."""
    scale = batch_norm_scale(running_var.to(dtype), bn_weight, eps)
    centred = -running_mean.to(dtype) if bias is None else bias.to(dtype) - running_mean.to(dtype)
    folded_bias = centred * scale if bn_bias is None else centred * scale + bn_bias.to(dtype)
    return weight.to(dtype) * scale[:, None, None, None], folded_bias


def _pre_activation(z, mean, var, bn_weight, bn_bias, residual, eps: float) -> torch.Tensor:
    """(z - mean) * gamma / sqrt(var + eps) + beta (+ residual), in the statistics' dtype."""
    zs = z.to(mean.dtype)
    pre = (zs - _channel(mean)) * _channel(batch_norm_scale(var, bn_weight, eps))
    if bn_bias is not None:
        pre = pre + _channel(bn_bias.to(zs.dtype))
    return pre if residual is None else pre + residual.to(zs.dtype)


def conv2d_batch_norm_relu(input, weight, bias, bn_weight, bn_bias, residual, eps: float, stride, padding,
                           dilation, groups) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training-mode ``relu(batch_norm(conv2d(input, weight, bias, ...)) + residual)`` with batch statistics.

    input (N, C_in, H, W); weight (C_out, C_in / groups, KH, KW); bias, bn_weight (gamma), bn_bias (beta):
    (C_out,) or None; residual: None or the output's shape (a ResNet block's identity). Returns
    ``(output, z, mean, var)``: the output and ``z = conv2d(...)`` in the input's dtype and memory format, the
    per-channel batch mean and biased variance of ``z`` (what BatchNorm2d normalises with) in
    :func:`statistics_dtype`. The normalisation and the add compute ``(z - mean) * scale + beta + residual`` in
    that dtype, rounded once.
    """
    z = F.conv2d(input, weight, bias, stride, padding, dilation, groups)
    var, mean = torch.var_mean(z.to(statistics_dtype(z.dtype)), dim=(0, 2, 3), correction=0)
    return torch.relu(_pre_activation(z, mean, var, bn_weight, bn_bias, residual, eps)).to(z.dtype), z, mean, var


def conv2d_batch_norm_relu_backward(grad_output, input, weight, z, mean, var, bn_weight, bn_bias, output,
                                    eps: float, stride, padding, dilation, groups, output_mask: Sequence[bool]):
    """Gradients of :func:`conv2d_batch_norm_relu` from ``z`` and the batch statistics:
    ``(grad_input, grad_weight, grad_bias, grad_bn_weight, grad_bn_bias, grad_residual)``, None where
    ``output_mask`` is False. ``output``: the forward's output where a residual was added (the ReLU's mask is
    then ``output > 0``, as torch's ReLU backward takes it), else None (the mask is recomputed from z).

    With xhat = (z - mean) / sqrt(var + eps), g = grad_output where gamma * xhat + beta > 0 (the ReLU's mask;
    g is also the residual's gradient), and M = N * OH * OW: grad_bn_bias = sum g, grad_bn_weight =
    sum g * xhat, and the convolution's output gets dz = gamma / sqrt(var + eps) * (g - sum g / M - xhat *
    sum (g * xhat) / M), computed in the statistics' dtype and rounded to z's, whose convolution gradients
    torch's ``convolution_backward`` takes.
    """
    dtype = mean.dtype
    invstd = torch.rsqrt(var + eps)
    xhat = (z.to(dtype) - _channel(mean)) * _channel(invstd)
    positive = output > 0 if output is not None else _pre_activation(z, mean, var, bn_weight, bn_bias, None, eps) > 0
    g = torch.where(positive, grad_output.to(dtype), 0)
    sum_g = g.sum((0, 2, 3))
    sum_gx = (g * xhat).sum((0, 2, 3))
    count = z.numel() // z.shape[1]
    scale = batch_norm_scale(var, bn_weight, eps)
    dz = _channel(scale) * (g - _channel(sum_g / count) - xhat * _channel(sum_gx / count))
    bias_sizes = [weight.shape[0]] if output_mask[2] else None
    grad_input, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
        dz.to(z.dtype), input, weight, bias_sizes, list(stride), list(padding), list(dilation), False, [0, 0],
        groups, [bool(output_mask[0]), bool(output_mask[1]), bool(output_mask[2])],
    )
    grad_gamma = sum_gx.to(bn_weight.dtype) if output_mask[3] else None
    grad_beta = sum_g.to(bn_bias.dtype) if output_mask[4] else None
    grad_residual = g.to(output.dtype) if output_mask[5] else None
    return grad_input, grad_weight, grad_bias, grad_gamma, grad_beta, grad_residual


# The largest piece of an fp32 gradient whose norm the CPU takes with torch's fp32 foreach kernel (its fast path;
# the float64 one, ``dtype=``, runs tensor by tensor: 52 vs 18 us on a small ConvNet's 8 gradients). Measured on
# this CPU (torch 2.14), relative error of torch's fp32 norm against float64, worst of 5 draws: 6.5e-7 at 2**16
# elements (a few fp32 ulps), 1.6e-6 at 2**18, 1.2e-5 at 2**20, 9.8e-5 at 2**22. A larger contiguous gradient
# is cut into pieces of this size whose squared norms are summed in float64: the fast kernel at fp32 accuracy
# (relative error 3e-7 against float64; 4M elements 9.6 -> 0.39 ms, 25.7M 65.7 -> 3.6 ms). Others
# (non-contiguous, 16-bit) stay float64.
CPU_FP32_NORM_MAX_NUMEL = 1 << 16


def grad_norm_accumulate(grads: Sequence[torch.Tensor], norm_type: float) -> torch.Tensor:
    """Per-tensor partial norms of ``grads`` in the additive form that a distributed all-reduce combines (with
    :func:`grad_norm_reduce_op`): ``sum |g|^p`` for a finite non-zero p (negative too), the count of non-zeros
    for p = 0, ``max |g|`` for inf, ``min |g|`` for -inf. All grads are on one device.

    The vector is float64 on the CPU (torch sums fp32 sequentially there: 1.1% off on VGG-16's 102.8M-element
    layer) and for every order but 2 and inf (``|g|^p`` of an fp32 gradient of 1e20 underflows fp32 at p = -2);
    float32 otherwise (float64 if any gradient is). On the CPU, fp32 gradients of at most
    ``CPU_FP32_NORM_MAX_NUMEL`` elements take torch's fp32 kernel for p = 2 (fp32 accuracy, several times
    faster: ``grad_norms`` on a small ConvNet's 8 gradients 96 -> 83 us), and every gradient its own dtype for
    inf (a max is exact in any dtype; 287 -> 72 us there).
    :func:`grad_norm_finalize` takes it from there.
    """
    device = grads[0].device
    exact = device.type == "cpu" or norm_type not in (2.0, math.inf)
    dtype = torch.float64 if exact or any(g.dtype == torch.float64 for g in grads) else torch.float32
    # An empty tensor (a local shard of a gradient spread over more ranks than it has rows) contributes the
    # all-reduce's identity: 0 to a sum or a max of |g|, +inf to the min of -inf.
    identity = torch.full((), math.inf if norm_type == -math.inf else 0.0, dtype=dtype, device=device)
    results = [identity] * len(grads)
    rest = [i for i, g in enumerate(grads) if g.numel()]
    if device.type == "cpu":
        native = [i for i in rest if _cpu_native(grads[i], norm_type)]
        if native:  # foreach calls in the gradients' own dtype (fp32 for 2): torch's fast paths
            picked = [grads[i] for i in native]
            # max |g| as max(abs): torch's CPU inf-norm kernel is 7x slower (228 vs 32 us on 8 tensors,
            # 5.4 vs 0.6 ms on 4M elements); NaN propagates alike. (The abs is a transient copy.)
            norms = (torch._foreach_max(torch._foreach_abs(picked)) if norm_type == math.inf
                     else _cpu_fp32_square_sums(picked).sqrt().unbind())
            for i, n in zip(native, norms):
                results[i] = n
            taken = set(native)
            rest = [i for i in rest if i not in taken]
    if rest:
        if norm_type > 0:
            norms = torch._foreach_norm([grads[i] for i in rest], norm_type, dtype=dtype)
        else:  # orders the foreach kernels do not take
            norms = [torch.linalg.vector_norm(grads[i], norm_type, dtype=dtype) for i in rest]
        for i, n in zip(rest, norms):
            results[i] = n
    out = torch.stack(results).to(dtype)  # (stack promotes a mix of dtypes)
    if math.isinf(norm_type) or norm_type == 0:
        return out
    if norm_type > 0:
        return out.pow_(norm_type)  # an identity stays 0
    nonempty = [i for i, g in enumerate(grads) if g.numel()]
    out[nonempty] = out[nonempty].pow(norm_type)  # not the identities: 0 ** -2 would be inf
    return out


def _cpu_native(g: torch.Tensor, norm_type: float) -> bool:
    """Whether the CPU takes ``g``'s norm with torch's fast foreach kernels: for inf every non-empty one (a max is
    exact in any dtype), for 2 the fp32 ones of at most ``CPU_FP32_NORM_MAX_NUMEL`` elements or contiguous
    (cut into pieces that size by :func:`_cpu_fp32_square_sums`)."""
    return g.numel() > 0 and (norm_type == math.inf or (
        norm_type == 2.0 and g.dtype == torch.float32
        and (g.numel() <= CPU_FP32_NORM_MAX_NUMEL or g.is_contiguous())))


def _cpu_fp32_square_sums(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """The float64 sums of squares of fp32 ``grads`` (see :func:`_cpu_native`): one fp32 foreach norm over
    pieces of at most ``CPU_FP32_NORM_MAX_NUMEL`` elements, their squares summed per gradient in float64."""
    pieces, owner = [], []
    for k, g in enumerate(grads):
        parts = (g,) if g.numel() <= CPU_FP32_NORM_MAX_NUMEL else g.view(-1).split(CPU_FP32_NORM_MAX_NUMEL)
        pieces += parts
        owner += [k] * len(parts)
    squares = torch.stack(torch._foreach_norm(pieces)).to(torch.float64).square_()
    if len(pieces) == len(grads):
        return squares
    index = torch.tensor(owner, device=squares.device)
    return torch.zeros(len(grads), dtype=torch.float64, device=squares.device).index_add_(0, index, squares)


def grad_norm_reduce_op(norm_type: float):
    """The all-reduce that combines :func:`grad_norm_accumulate`'s vectors of several shards."""
    import torch.distributed as dist

    if norm_type == math.inf:
        return dist.ReduceOp.MAX
    if norm_type == -math.inf:
        return dist.ReduceOp.MIN
    return dist.ReduceOp.SUM


def grad_norm_finalize(acc: torch.Tensor, norm_type: float, max_norm: float, scale: torch.Tensor | None = None,
                       round_to: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
    """(per-tensor norms, total norm, finite flag, clip coefficient) from :func:`grad_norm_accumulate`'s vector,
    in its dtype.

    The total is what ``torch.nn.utils.clip_grad_norm_`` computes, the norm of the per-tensor norms (for p = 0:
    how many gradients have a non-zero element). ``scale``: the gradients carry a loss scale (GradScaler) that
    the reported norms divide out (a count of non-zeros has none). ``round_to``: the total is rounded to this
    dtype before the finite flag and the coefficient are taken from it (torch's total is in the gradients'
    dtype: in float16 a total over 65504 is inf). The clip coefficient is ``min(1, max_norm / (total + 1e-6))``
    as in torch (NaN stays NaN).
    """
    if norm_type == math.inf:
        norms, total = acc, acc.amax() if acc.numel() else acc.new_zeros(())  # amax propagates NaN
    elif norm_type == -math.inf:
        norms, total = acc, acc.amin()
    elif norm_type == 0:
        norms, total = acc, (acc != 0).sum().to(acc.dtype)
    else:
        norms, total = acc.pow(1.0 / norm_type), acc.sum().pow(1.0 / norm_type)
    if scale is not None and norm_type != 0:
        inv = 1.0 / scale.to(acc.dtype)
        norms, total = norms * inv, total * inv
    if round_to is not None:
        total = total.to(round_to).to(acc.dtype)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    return norms, total, torch.isfinite(total), coef
