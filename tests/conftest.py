"""Test set-up. Without a GPU the Triton kernels run through Triton's CPU interpreter.

``TRITON_INTERPRET`` is read when a kernel is defined, so it is set here, before anything imports
``cnnperf.kernels``. Under the interpreter the default backend is ``reference`` (interpreted kernels are slow):
tests of the kernels themselves ask for them with ``cnnperf.backend.override("triton")``.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if os.environ["TRITON_INTERPRET"] == "1":
        os.environ.setdefault("CNNPERF_BACKEND", "reference")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of small-tensor tests: on a busy 2-core machine a second thread only adds
    waits at every op (ten times slower, measured). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
