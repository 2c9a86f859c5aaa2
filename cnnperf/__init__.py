"""cnnperf: fast and healthy CNN training in PyTorch.

- :mod:`cnnperf.functional` / :mod:`cnnperf.nn`: fused ops and drop-in layers (Triton on CUDA, reference
  PyTorch ops on the CPU; see :mod:`cnnperf.backend`).
- :func:`cnnperf.fuse`: turns each Conv2d -> ReLU (and, in eval mode, Conv2d -> BatchNorm2d -> ReLU) of a
  model into one fused layer.
- :func:`cnnperf.clip_grad_norm_` / :func:`cnnperf.grad_norms`: gradient norms and clipping over all
  parameters in one pass, without host synchronisation.
- :func:`cnnperf.profile` / :func:`cnnperf.optimize`: measure which speed-ups (AMP, channels_last,
  torch.compile, fused layers, loader workers, ...) make a model train faster, and apply the winner.
"""

from cnnperf import backend, functional, nn
from cnnperf._version import __version__
from cnnperf.fusion import FuseReport, fuse
from cnnperf.ops.grad_norm import GradNorms, clip_grad_norm_, grad_norms
from cnnperf.profiler import Optimized, ProfileResult, optimize, profile

__all__ = ["backend", "functional", "nn", "fuse", "FuseReport", "clip_grad_norm_", "grad_norms", "GradNorms",
           "profile", "optimize", "ProfileResult", "Optimized", "__version__"]
