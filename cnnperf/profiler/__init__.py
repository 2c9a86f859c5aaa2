"""cnnperf's profiler: which speed-ups make *this* model train faster here, measured side by side.

- :func:`profile` measures the variants (AMP, channels_last, torch.compile, cnnperf.fuse, TF32,
  cudnn.benchmark, loader workers and their combinations) and recommends the fastest numerically sound one.
- :func:`optimize` applies a variant to copies of a model and its optimizer.
- ``cnnperf profile`` (:mod:`cnnperf.profiler.cli`) does both from the command line and writes the reports.
"""

from cnnperf.profiler.apply import Optimized, optimize
from cnnperf.profiler.core import ProfileError, ProfileInterrupted, ProfileResult, profile
from cnnperf.profiler.variants import OPTIONS, TOLERANCES, VariantError

__all__ = ["profile", "optimize", "ProfileResult", "ProfileError", "ProfileInterrupted", "Optimized", "OPTIONS",
           "TOLERANCES", "VariantError"]
