"""Functional forms of cnnperf's fused ops (the ``torch.nn.functional`` of cnnperf)."""

from cnnperf.ops.conv_batch_norm_relu import conv2d_batch_norm_relu
from cnnperf.ops.conv_bias_relu import conv2d_bias_relu

__all__ = ["conv2d_bias_relu", "conv2d_batch_norm_relu"]
