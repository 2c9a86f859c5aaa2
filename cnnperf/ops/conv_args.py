"""The argument checks and layout rules that every fused convolution op shares (conv2d_bias_relu,
conv2d_batch_norm_relu): every argument form :func:`torch.nn.functional.conv2d` takes, checked once at the public
entry with the op's name, the argument and the shapes in the message."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from torch._prims_common import suggest_memory_format  # ATen's Tensor.suggest_memory_format, in Python

from cnnperf.perf_model import output_hw

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class ConvArgs(NamedTuple):
    """A convolution's arguments after :func:`conv_arguments`: a 4-D input (string padding applied), pairs."""
    input: torch.Tensor
    stride: list[int]
    padding: list[int]
    dilation: list[int]
    groups: int
    unbatched: bool  # the caller passed (C, H, W): squeeze the batch dim of the result


def conv_arguments(op: str, input, weight, bias, stride, padding, dilation, groups) -> ConvArgs:
    """Check and normalise a convolution's arguments as :func:`torch.nn.functional.conv2d` takes them (ints or
    pairs, ``padding='same'`` or ``'valid'``, unbatched (C, H, W) input); errors name ``op``."""
    _check_tensors(op, input, weight, bias)
    groups = _check_groups(op, groups, input, weight)
    stride = pair(op, "stride", stride, minimum=1)
    dilation = pair(op, "dilation", dilation, minimum=1)
    unbatched = input.dim() == 3
    if unbatched:
        input = input.unsqueeze(0)
    if isinstance(padding, str):
        input, padding = _string_padding(op, padding, input, weight, stride, dilation)
    else:
        padding = pair(op, "padding", padding, minimum=0)
    _check_output_size(op, input, weight, stride, padding, dilation)
    return ConvArgs(input, stride, padding, dilation, groups, unbatched)


def check_residual(op: str, residual, input, shape: tuple, unbatched: bool) -> tuple[torch.Tensor, bool]:
    """(residual, unbatched): a residual added before a fused op's ReLU, 4-D when it has the unbatched output's
    ``shape[1:]``, and whether the result is still unbatched (a 4-D residual makes eager's sum 4-D); an error
    naming it when it is no floating-point tensor or on another device than ``input``. (Any other shape
    broadcasts, as in eager's add.)"""
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"{op}: residual must be a torch.Tensor or None, got {type(residual).__name__}")
    if residual.device != input.device:
        raise RuntimeError(f"{op}: residual is on {residual.device} but input {tuple(input.shape)} on "
                           f"{input.device}")
    if not residual.is_floating_point():
        raise TypeError(f"{op}: residual must be a floating-point tensor, got {residual.dtype}")
    unbatched = unbatched and residual.dim() < 4
    return (residual.unsqueeze(0) if unbatched and tuple(residual.shape) == tuple(shape[1:]) else residual,
            unbatched)


def odd_residual(residual, shape: tuple, dtype: torch.dtype) -> bool:
    """Whether a residual is not the output's ``shape`` and ``dtype`` (one that broadcasts, or promotes the sum
    as eager's add would): torch's ops take such a call, and do exactly that."""
    return residual is not None and (tuple(residual.shape) != tuple(shape) or residual.dtype != dtype)


def has_tangent(*tensors) -> bool:
    """Whether forward-mode AD is active and any of ``tensors`` carries a tangent (a dual tensor)."""
    if getattr(forward_ad, "_current_level", 0) < 0:  # no dual level is open: the common case, checked cheaply
        return False
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def functorch_active() -> bool:
    """Whether a torch.func transform (grad, vjp, jacrev, hessian, vmap, jvp) is tracing this call."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active()) if active is not None else False


def _check_tensors(op: str, input, weight, bias):
    for name, t in (("input", input), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"{op}: bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if input.dim() not in (3, 4):
        raise ValueError(f"{op}: input must be 3-D (C, H, W) or 4-D (N, C, H, W), got shape {tuple(input.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"{op}: weight must be 4-D (C_out, C_in/groups, KH, KW), got shape {tuple(weight.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"{op}: bias must have shape ({weight.shape[0]},) to match weight {tuple(weight.shape)}, "
                         f"got {tuple(bias.shape)}")
    tensors = [("input", input), ("weight", weight)] + ([("bias", bias)] if bias is not None else [])
    for name, t in tensors:
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} must be a floating-point tensor (float16, bfloat16, float32, float64), "
                            f"got {t.dtype} with shape {tuple(t.shape)}")
    devices = {t.device for _, t in tensors}
    if len(devices) > 1:
        where = ", ".join(f"{name} {tuple(t.shape)} on {t.device}" for name, t in tensors)
        raise RuntimeError(f"{op}: all tensors must be on one device; got {where}")
    if not torch.is_autocast_enabled(input.device.type):
        dtypes = {t.dtype for _, t in tensors}
        if len(dtypes) > 1:
            what = ", ".join(f"{name} {t.dtype} {tuple(t.shape)}" for name, t in tensors)
            raise TypeError(f"{op}: input, weight and bias must have one dtype; got {what}")


def _check_groups(op: str, groups, input, weight) -> int:
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"{op}: groups must be a positive int, got {groups!r}")
    c_in = input.shape[-3]
    c_out, c_in_g = weight.shape[0], weight.shape[1]
    if c_in != c_in_g * groups:
        raise ValueError(f"{op}: input has {c_in} channels (shape {tuple(input.shape)}) but weight "
                         f"{tuple(weight.shape)} with groups={groups} expects {c_in_g * groups}")
    if c_out % groups:
        raise ValueError(f"{op}: weight has {c_out} output channels (shape {tuple(weight.shape)}), "
                         f"not divisible by groups={groups}")
    return groups


def pair(op: str, name: str, value, minimum: int) -> list[int]:
    if isinstance(value, torch.Size):
        value = tuple(value)
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    elif isinstance(value, (tuple, list)) and len(value) == 1:
        value = (value[0], value[0])
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise ValueError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")
    if min(value) < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {tuple(value)}")
    return [int(value[0]), int(value[1])]


def _string_padding(op: str, padding: str, input, weight, stride, dilation):
    """'valid' is no padding; 'same' pads so that OH == H (stride 1 only), asymmetric as torch does it."""
    if padding == "valid":
        return input, [0, 0]
    if padding != "same":
        raise ValueError(f"{op}: padding must be 'same', 'valid', an int or a pair of ints, got {padding!r}")
    if stride != [1, 1]:
        raise ValueError(f"{op}: padding='same' is not supported for strided convolutions (stride={tuple(stride)})")
    totals = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
    symmetric = [t // 2 for t in totals]
    extra = [t % 2 for t in totals]
    if any(extra):
        # Odd total padding: torch puts the extra row/column at the bottom/right. Pad it explicitly.
        input = F.pad(input, (0, extra[1], 0, extra[0]))
    return input, symmetric


def _check_output_size(op: str, input, weight, stride, padding, dilation):
    oh, ow = output_hw(input.shape[2:], weight.shape[2:], stride, padding, dilation)
    if oh <= 0 or ow <= 0:
        raise ValueError(f"{op}: output would be empty ({oh}x{ow}): input {tuple(input.shape)}, weight "
                         f"{tuple(weight.shape)}, stride={tuple(stride)}, padding={tuple(padding)}, "
                         f"dilation={tuple(dilation)}")


def torch_format(input: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    """torch's rule for a convolution's results (ATen's mkldnn/thnn/cudnn ``*_use_channels_last``):
    channels_last when the input's or the weight's strides suggest it."""
    if any(suggest_memory_format(t) == torch.channels_last for t in (input, weight)):
        return torch.channels_last
    return torch.contiguous_format


def memory_format(input: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    """The memory format of the output and of the input's gradient: channels_last on CUDA, always (the kernels
    write NHWC; a contiguous result would cost a copy); on the CPU :func:`torch_format`, so that the fused op
    returns what ``relu(conv2d(...))`` returns. (The weight's gradient follows :func:`torch_format` on every
    device: a parameter's ``.grad`` takes the parameter's own layout in any case.)"""
    return torch.channels_last if input.device.type == "cuda" else torch_format(input, weight)
