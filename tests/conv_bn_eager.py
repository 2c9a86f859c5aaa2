"""The float64 eager twin of a FusedConv2dBatchNormReLU, and a training run that compares the two step by step.

Shared by the reference-path tests (tests/test_conv_batch_norm_relu.py) and the kernel tests
(tests/test_conv_batch_norm_relu_triton.py).
"""

from __future__ import annotations

import torch
from torch import nn

from cnnperf.nn import FusedConv2dBatchNormReLU
from cnnperf.testing import assert_close


def eager_twin(layer: FusedConv2dBatchNormReLU) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    """An ``nn.Conv2d`` and an ``nn.BatchNorm2d`` in float64 on the CPU with ``layer``'s state."""
    conv = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                     layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode).double()
    bn = layer.bn
    twin_bn = nn.BatchNorm2d(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats).double()
    conv.load_state_dict({k: v.double().cpu() for k, v in layer.state_dict().items() if not k.startswith("bn.")})
    twin_bn.load_state_dict({k: (v.double() if v.is_floating_point() else v).cpu() for k, v in bn.state_dict().items()})
    twin_bn.train(bn.training)
    return conv, twin_bn


def randomize(layer: FusedConv2dBatchNormReLU) -> FusedConv2dBatchNormReLU:
    """gamma, beta and the running statistics away from 1 and 0, so that each one matters."""
    bn = layer.bn
    with torch.no_grad():
        if bn.affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        if bn.track_running_stats:
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return layer


def compare_training(layer: FusedConv2dBatchNormReLU, input_shape, *, steps: int = 3, dtype=None,
                     channels_last: bool = False, offset: float = 1.0, eval_step: bool = True,
                     residual: bool = False) -> None:
    """Train ``layer`` and its float64 twin ``steps`` steps on the same random inputs and output gradients, then
    one step in eval mode; after each, compare the output, every gradient (input, conv weight and bias, gamma,
    beta) and the running statistics within ``dtype``'s row of the tolerance table, and num_batches_tracked
    exactly. ``offset``: the inputs' mean (a non-zero batch mean is what the statistics must get right).
    ``residual``: a random residual of the output's shape is added before the ReLU, and its gradient compared."""
    conv, bn = eager_twin(layer)
    device = layer.weight.device
    dtype = dtype or layer.weight.dtype
    modes = [True] * steps + ([False] if eval_step else [])
    for step, training in enumerate(modes):
        layer.train(training)
        bn.train(training)
        x = torch.randn(input_shape, device=device, dtype=dtype) * 2 + offset
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        x64 = x.detach().double().cpu().requires_grad_(True)
        r = r64 = None
        if residual:
            shape = conv(x64[:1]).shape[1:]
            r = torch.randn((x.shape[0], *shape), device=device, dtype=dtype).requires_grad_(True)
            r64 = r.detach().double().cpu().requires_grad_(True)
        out = layer(x, r)
        pre = bn(conv(x64))
        expected = torch.relu(pre if r64 is None else pre + r64)
        where = f"step {step} ({'train' if training else 'eval'})"
        assert out.dtype == dtype, where
        assert_close(out, expected, dtype, name=f"{where}: output")
        grad = torch.randn_like(out)
        out.backward(grad)
        expected.backward(grad.double().cpu())
        assert_close(x.grad, x64.grad, dtype, name=f"{where}: grad of input")
        if residual:
            assert_close(r.grad, r64.grad, dtype, name=f"{where}: grad of residual")
        pairs = [("weight", layer.weight, conv.weight), ("bias", layer.bias, conv.bias),
                 ("bn.weight", layer.bn.weight, bn.weight), ("bn.bias", layer.bn.bias, bn.bias)]
        for name, p, q in pairs:
            if p is None:
                continue
            # A parameter's gradient is in the parameter's dtype; its rounding is that of the computation's dtype.
            assert_close(p.grad, q.grad, dtype, name=f"{where}: grad of {name}")
        if layer.bn.track_running_stats:
            assert_close(layer.bn.running_mean, bn.running_mean, dtype, name=f"{where}: running_mean")
            assert_close(layer.bn.running_var, bn.running_var, dtype, name=f"{where}: running_var")
            assert layer.bn.num_batches_tracked.item() == bn.num_batches_tracked.item(), where
        for m in (layer, conv, bn):
            m.zero_grad(set_to_none=True)
