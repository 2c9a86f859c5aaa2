"""cnnperf's Triton kernels (installed as ``cnnperf.kernels``): ``@triton.jit`` functions and config lists only.

Host code that launches them lives in ``cnnperf/ops/``; import this package only where Triton is installed.
"""
