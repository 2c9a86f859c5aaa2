"""Drop-in ``nn`` modules backed by cnnperf's fused ops."""

from __future__ import annotations

import torch
from torch import nn

from cnnperf.ops.conv_batch_norm_relu import conv2d_batch_norm_relu
from cnnperf.ops.conv_bias_relu import conv2d_bias_relu

__all__ = ["FusedConv2dBiasReLU", "FusedConv2dBatchNormReLU", "BatchNorm2dInFusedConv"]

# torch.fx records conv2d_bias_relu as one call instead of tracing into its argument checks, so models made
# of fused layers stay symbolically traceable (and fuse() can run on them again).
torch.fx.wrap("conv2d_bias_relu")
torch.fx.wrap("conv2d_batch_norm_relu")


class FusedConv2dBiasReLU(nn.Conv2d):
    """``nn.Conv2d`` followed by ReLU, computed by one fused op; ``layer(x, residual)`` adds a residual before
    the ReLU (a ResNet block's last conv with its BatchNorm folded in: ``relu(conv(x) + identity)``).

    Same constructor, parameters and ``state_dict`` as :class:`torch.nn.Conv2d`, so a checkpoint moves either
    way. ``padding_mode`` other than ``'zeros'`` pads explicitly first, as ``nn.Conv2d`` does.
    """

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.padding_mode != "zeros":
            pad = self._reversed_padding_repeated_twice
            input = nn.functional.pad(input, pad, mode=self.padding_mode)
            return conv2d_bias_relu(input, self.weight, self.bias, self.stride, 0, self.dilation, self.groups,
                                    residual=residual)
        return conv2d_bias_relu(input, self.weight, self.bias, self.stride, self.padding, self.dilation,
                                self.groups, residual=residual)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "FusedConv2dBiasReLU":
        """A fused layer that shares ``conv``'s parameters (no copy), on the same device and dtype."""
        fused = cls.__new__(cls)
        _share_state(fused, conv)  # fresh hook and module dicts: nothing shared with conv but its tensors
        fused._modules.update(conv._modules)
        return fused


# The hooks on a module's state_dict: they travel with its parameters and buffers (forward hooks do not: a layer
# with them is not fused at all).
_STATE_DICT_HOOKS = ("_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                     "_load_state_dict_post_hooks")


def _share_state(new: nn.Module, old: nn.Module) -> None:
    """Make ``new`` (made with ``__new__``) a module with ``old``'s attributes, parameters and buffers (shared
    tensors, no copy) and state_dict hooks, and fresh forward-hook and child dicts."""
    nn.Module.__init__(new)
    module_state = set(new.__dict__)
    new.__dict__.update({k: v for k, v in old.__dict__.items() if k not in module_state})
    new.__dict__.update({k: old.__dict__[k] for k in _STATE_DICT_HOOKS if k in old.__dict__})
    new.training = old.training
    new._parameters.update(old._parameters)
    new._buffers.update(old._buffers)
    new._non_persistent_buffers_set.update(old._non_persistent_buffers_set)


class BatchNorm2dInFusedConv(nn.BatchNorm2d):
    """A ``BatchNorm2d`` whose normalisation the :class:`FusedConv2dBatchNormReLU` before it computes.

    :func:`cnnperf.fuse` leaves it in the BatchNorm2d's place, so that the parameters, the running statistics
    and their ``state_dict`` keys stay where they were (checkpoints move both ways) and code that looks for
    BatchNorm layers (no weight decay on them, ``.eval()`` to freeze them) still finds them. Its ``training``
    flag is the BatchNorm's mode. Its forward returns its input unchanged: it is never called by the fused model.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return input

    @classmethod
    def from_batch_norm(cls, bn: nn.BatchNorm2d) -> "BatchNorm2dInFusedConv":
        """One that shares ``bn``'s parameters and buffers (no copy)."""
        new = cls.__new__(cls)
        _share_state(new, bn)
        return new


class FusedConv2dBatchNormReLU(nn.Conv2d):
    """``nn.Conv2d`` -> ``nn.BatchNorm2d`` -> ReLU as one fused op, for training and inference; ``forward(input,
    residual)`` adds a residual before the ReLU (a ResNet block's last conv: ``relu(bn(conv(x)) + identity)``).

    The constructor takes ``nn.Conv2d``'s arguments (``bias`` defaults to False: a BatchNorm right after it
    cancels a bias) and ``nn.BatchNorm2d``'s (``eps``, ``momentum``, ``affine``, ``track_running_stats``).
    The convolution's parameters are this layer's own (``weight``, ``bias``, as ``nn.Conv2d``'s); the BatchNorm's
    state is the ``nn.BatchNorm2d`` ``self.bn``, and its mode (``self.bn.training``) decides, exactly as in
    ``nn.BatchNorm2d.forward``: batch statistics in training (biased variance to normalise; running statistics
    updated with the unbiased one, with ``momentum`` or, for ``momentum=None``, a cumulative average over
    ``num_batches_tracked``), the running statistics in eval (folded into the convolution's weight and bias).

    Made by :func:`cnnperf.fuse` from a ``Conv2d`` and a ``BatchNorm2d``, ``self.bn`` is the
    :class:`BatchNorm2dInFusedConv` left in the BatchNorm's place (not a child of this layer), so the model's
    ``state_dict`` keeps its keys.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = False, padding_mode: str = "zeros", eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True, track_running_stats: bool = True, device=None,
                 dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device=device, dtype=dtype)
        self.bn = nn.BatchNorm2d(out_channels, eps, momentum, affine, track_running_stats, device=device,
                                 dtype=dtype)

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        bn = self.bn
        bn._check_input_dim(input)  # 4-D, as BatchNorm2d wants its input (the conv keeps the batch dim)
        factor = 0.0 if bn.momentum is None else bn.momentum  # nn.BatchNorm2d.forward, step by step
        if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
        track = not bn.training or bn.track_running_stats
        padding = self.padding
        if self.padding_mode != "zeros":
            input = nn.functional.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return conv2d_batch_norm_relu(
            input, self.weight, self.bias, self.stride, padding, self.dilation, self.groups,
            running_mean=bn.running_mean if track else None, running_var=bn.running_var if track else None,
            bn_weight=bn.weight, bn_bias=bn.bias, training=batch_stats, momentum=factor, eps=bn.eps,
            residual=residual)

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> "FusedConv2dBatchNormReLU":
        """A fused layer that shares ``conv``'s parameters (no copy) and uses ``bn`` without owning it: ``bn``
        stays registered where it is (:func:`cnnperf.fuse` passes a :class:`BatchNorm2dInFusedConv`)."""
        if conv.out_channels != bn.num_features:
            raise ValueError(f"FusedConv2dBatchNormReLU: conv has {conv.out_channels} output channels but bn "
                             f"{bn.num_features} features")
        fused = cls.__new__(cls)
        _share_state(fused, conv)
        fused._modules.update(conv._modules)
        object.__setattr__(fused, "bn", bn)  # not registered: its state stays under its own name
        return fused

    def extra_repr(self) -> str:
        owned = "bn" in self._modules
        return super().extra_repr() + ("" if owned else f", bn={self.bn.num_features} features held outside")
