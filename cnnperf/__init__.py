"""cnnperf: fast and healthy CNN training in PyTorch.

- :mod:`cnnperf.functional` / :mod:`cnnperf.nn`: fused ops and drop-in layers (Triton on CUDA, reference
  PyTorch ops on the CPU; see :mod:`cnnperf.backend`).
- :func:`cnnperf.fuse`: turns each Conv2d -> ReLU (and, in eval mode, Conv2d -> BatchNorm2d -> ReLU) of a
  model into one fused layer.
"""

from cnnperf import backend, functional, nn
from cnnperf.fuse import FuseReport, fuse

__version__ = "0.1.0"
__all__ = ["backend", "functional", "nn", "fuse", "FuseReport", "__version__"]
