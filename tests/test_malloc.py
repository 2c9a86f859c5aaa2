"""cnnperf._malloc: whether glibc's mmap threshold adapts, fixing it for a benchmark's process, and the
profiler's note. Fixing it cannot be undone, so it runs in child processes here."""

import os
import subprocess
import sys

import pytest

from cnnperf import _malloc
from cnnperf.profiler.policy import drifting_allocator

glibc = pytest.mark.skipif(_malloc._glibc() is None, reason="not glibc: no adaptive mmap threshold to fix")


def child(code: str, **env) -> str:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    return subprocess.run([sys.executable, "-c", code], env={**environ, **env}, capture_output=True, text=True,
                          check=True).stdout.strip()


@glibc
def test_fixing_the_threshold_turns_the_adjustment_off_once():
    out = child("from cnnperf import _malloc as m; a = m.dynamic_mmap_threshold(); b = m.fix_mmap_threshold(); "
                "print(a, b['mmap_threshold'], b['trim_threshold'], m.dynamic_mmap_threshold(), "
                "m.fix_mmap_threshold())")
    assert out == f"True {32 << 20} {1 << 30} False None"


@glibc
@pytest.mark.parametrize("env", [{"MALLOC_MMAP_THRESHOLD_": "33554432"}, {"MALLOC_TRIM_THRESHOLD_": "1"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=33554432"},
                                 {"LD_PRELOAD": "/nonexistent/libjemalloc.so.2"}])
def test_a_threshold_or_allocator_from_the_environment_counts_as_fixed(env):
    assert child("from cnnperf import _malloc as m; print(m.dynamic_mmap_threshold(), m.fix_mmap_threshold())",
                 **env).splitlines()[-1] == "False None"


def test_the_profilers_note_names_the_variables():
    assert drifting_allocator(None, _malloc.ENVIRONMENT) is None and drifting_allocator(False, "X") is None
    note = drifting_allocator(True, _malloc.ENVIRONMENT)
    assert "MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824" in note
    assert note.startswith("Note: glibc malloc adapts its mmap threshold")
