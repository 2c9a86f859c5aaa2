"""Drop-in ``nn`` modules backed by cnnperf's fused ops."""

from __future__ import annotations

import torch
from torch import nn

from cnnperf.ops.conv_bias_relu import conv2d_bias_relu

__all__ = ["FusedConv2dBiasReLU"]

# torch.fx records conv2d_bias_relu as one call instead of tracing into its argument checks, so models made
# of fused layers stay symbolically traceable (and fuse() can run on them again).
torch.fx.wrap("conv2d_bias_relu")


class FusedConv2dBiasReLU(nn.Conv2d):
    """``nn.Conv2d`` followed by ReLU, computed by one fused op.

    Same constructor, parameters and ``state_dict`` as :class:`torch.nn.Conv2d`, so a checkpoint moves either
    way. ``padding_mode`` other than ``'zeros'`` pads explicitly first, as ``nn.Conv2d`` does.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros":
            pad = self._reversed_padding_repeated_twice
            input = nn.functional.pad(input, pad, mode=self.padding_mode)
            return conv2d_bias_relu(input, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)
        return conv2d_bias_relu(input, self.weight, self.bias, self.stride, self.padding, self.dilation,
                                self.groups)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "FusedConv2dBiasReLU":
        """A fused layer that shares ``conv``'s parameters (no copy), on the same device and dtype."""
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)  # fresh hook, parameter, buffer and module dicts: nothing shared with conv
        module_state = set(fused.__dict__)
        fused.__dict__.update({k: v for k, v in conv.__dict__.items() if k not in module_state})
        fused.training = conv.training
        fused._parameters.update(conv._parameters)
        fused._buffers.update(conv._buffers)
        fused._non_persistent_buffers_set.update(conv._non_persistent_buffers_set)
        fused._modules.update(conv._modules)
        return fused
