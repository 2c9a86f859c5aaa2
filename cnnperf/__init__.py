"""cnnperf: fast and healthy CNN training in PyTorch.

- :mod:`cnnperf.functional` / :mod:`cnnperf.nn`: fused ops and drop-in layers (Triton on CUDA, reference
  PyTorch ops on the CPU; see :mod:`cnnperf.backend`).
- :func:`cnnperf.fuse`: turns each Conv2d -> ReLU (and, in eval mode, Conv2d -> BatchNorm2d -> ReLU) of a
  model into one fused layer.
- :func:`cnnperf.clip_grad_norm_` / :func:`cnnperf.grad_norms`: gradient norms and clipping over all
  parameters in one pass, without host synchronisation.
"""

from cnnperf import backend, functional, nn
from cnnperf.fuse import FuseReport, fuse
from cnnperf.ops.grad_norm import GradNorms, clip_grad_norm_, grad_norms

__version__ = "0.1.0"
__all__ = ["backend", "functional", "nn", "fuse", "FuseReport", "clip_grad_norm_", "grad_norms", "GradNorms",
           "__version__"]
