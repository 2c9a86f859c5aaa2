"""Saving and putting back the random states a profile draws from, so that profiling leaves them as it found
them: torch's (the CPU's and every initialised CUDA device's), Python's, NumPy's (where installed) and the
generators of a DataLoader and its samplers. Imports torch (NumPy only where it is installed).
"""

from __future__ import annotations

import random

import torch


class RandomState:
    """torch's (CPU and every initialised CUDA device), Python's and NumPy's random states and the generators of
    a DataLoader and its sampler, saved now and put back by :meth:`restore`."""

    def __init__(self, loader=None):
        self.torch = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        self.python = random.getstate()
        try:
            import numpy

            self.numpy = numpy.random.get_state()
        except ImportError:
            self.numpy = None
        self.generators = []
        if loader is not None:
            for owner in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None),
                          getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
                g = getattr(owner, "generator", None)
                if isinstance(g, torch.Generator) and all(g is not h for h, _ in self.generators):
                    self.generators.append((g, g.get_state()))

    def restore(self) -> None:
        torch.set_rng_state(self.torch)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        random.setstate(self.python)
        if self.numpy is not None:
            import numpy

            numpy.random.set_state(self.numpy)
        for g, state in self.generators:
            g.set_state(state)
