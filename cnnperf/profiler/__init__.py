"""cnnperf's profiler: which speed-ups make *this* model train faster here, measured side by side.

- :func:`profile` measures the variants (AMP, channels_last, torch.compile, cnnperf.fuse, TF32,
  cudnn.benchmark, loader workers and their combinations) and recommends the fastest numerically sound one.
- :func:`optimize` applies a variant to copies of a model and its optimizer.
- ``cnnperf profile`` (:mod:`cnnperf.profiler.cli`) does both from the command line and writes the reports.

The modules, each importing only those above it: :mod:`~cnnperf.profiler.policy` (the recommendation, pure),
:mod:`~cnnperf.profiler.report` (the renderers of a record), :mod:`~cnnperf.profiler.variants` (the options and
how a copy is built), :mod:`~cnnperf.profiler.step` (the training step), :mod:`~cnnperf.profiler.measure`,
:mod:`~cnnperf.profiler.ranks`, :mod:`~cnnperf.profiler.random_state`, :mod:`~cnnperf.profiler.sweep`,
:mod:`~cnnperf.profiler.core` (the run), :mod:`~cnnperf.profiler.apply` (``optimize``), :mod:`~cnnperf.profiler.cli`.
"""

from cnnperf.profiler.apply import Optimized, optimize
from cnnperf.profiler.core import ProfileError, ProfileInterrupted, ProfileResult, profile
from cnnperf.profiler.variants import OPTIONS, VariantError

__all__ = ["profile", "optimize", "ProfileResult", "ProfileError", "ProfileInterrupted", "Optimized", "OPTIONS",
           "VariantError"]
