"""cnnperf's benchmarks: each a short module declaring its cases and variants on one harness.

- :mod:`cnnperf.benchmarks.conv` (``cnnperf bench``): the fused conv2d + bias + ReLU against eager PyTorch/cuDNN
  and torch.compile on the convolution shapes of ResNet-50 and VGG-16.
- :mod:`cnnperf.benchmarks.clip` (``cnnperf bench-clip``): the fused gradient norm + clip against torch's
  ``clip_grad_norm_`` on the gradients of ResNet-50, VGG-16 and 1,000 tiny tensors.
- :mod:`cnnperf.benchmarks.harness`: what they share (options, run loop, rows, record, exit status).
"""
