"""The conv kernels' tuned configs in a file a user can keep and ship: ``CNNPERF_CONFIG_CACHE=path.json``.

With the variable set, a config found in the file for this device, Triton version, kernel, dtype and shape is
launched as is (no tuning, the same every run, and usable inside CUDA-graph capture); with
``CNNPERF_AUTOTUNE=1`` a shape not in the file is autotuned once and its winner added to the file (written
atomically, merged with what other processes wrote meanwhile). Without the variable nothing is read or written.

The file is JSON: ``{"schema": "cnnperf.conv_configs/1", "entries": {key: config}}``; a key names the device,
the Triton and cnnperf versions, the kernel (fwd, dgrad, wgrad), the dtype and its dot precision, and the
problem's sizes, so one file can hold several GPUs, and an upgrade re-tunes instead of launching a config
tuned for other code. Writers take a lock file beside it (``path.lock``), so processes that tune at once
(one per rank) merge their entries. An entry that is not a config is ignored with a warning.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import warnings

SCHEMA = "cnnperf.conv_configs/1"
ENV = "CNNPERF_CONFIG_CACHE"

_lock = threading.Lock()
# path -> ((inode, mtime_ns, size) or None when there is no file, entries, when it was looked at)
_loaded: dict[str, tuple[tuple | None, dict, float]] = {}
# lookup() runs on every kernel launch: it looks at the file again (a stat) at most this often.
RECHECK_S = 1.0
_TILE_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K")


def path() -> str | None:
    """The cache file named by ``CNNPERF_CONFIG_CACHE``, or None."""
    return os.environ.get(ENV) or None


def key(device: str, versions: str, kind: str, dtype: str, problem) -> str:
    """The entry's key: device, versions (``"triton 3.6.0 cnnperf 0.4.0"``), kernel, dtype (with its dot
    precision for fp32), then the problem's sizes (a perf_model.Conv)."""
    sizes = (f"n{problem.n} c{problem.c_in} h{problem.h} w{problem.w} k{problem.c_out} r{problem.kh}x{problem.kw}"
             f" s{problem.stride[0]}x{problem.stride[1]} p{problem.padding[0]}x{problem.padding[1]}"
             f" d{problem.dilation[0]}x{problem.dilation[1]} g{problem.groups} b{int(problem.has_bias)}")
    return f"{device} | {versions} | {kind} | {dtype} | {sizes}"


def _valid(config) -> bool:
    return isinstance(config, dict) and all(isinstance(config.get(k), int) and config[k] > 0 for k in _TILE_KEYS)


def _read(file: str) -> dict:
    try:
        with open(file) as f:
            record = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise RuntimeError(f"{ENV}={file}: cannot read it as a config cache ({e}); delete it or point {ENV} "
                           f"elsewhere") from e
    if not isinstance(record, dict) or record.get("schema") != SCHEMA or not isinstance(record.get("entries"), dict):
        raise RuntimeError(f"{ENV}={file}: not a cnnperf config cache (expected schema {SCHEMA!r})")
    return record["entries"]


def _stamp(file: str) -> tuple:
    st = os.stat(file)
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def lookup(file: str, entry: str) -> dict | None:
    """The config stored under ``entry`` in ``file`` (re-read when the file changed, looked at again at most
    every ``RECHECK_S`` seconds), or None."""
    with _lock:
        now = time.monotonic()
        cached = _loaded.get(file)
        if cached is None or now - cached[2] >= RECHECK_S:
            try:
                stamp = _stamp(file)
            except FileNotFoundError:
                stamp = None  # no file (yet): no entries
            entries = (cached[1] if cached is not None and cached[0] == stamp
                       else _read(file) if stamp is not None else {})
            cached = (stamp, entries, now)
            _loaded[file] = cached
        config = cached[1].get(entry)
        if config is None:
            return None
        if not _valid(config):
            warnings.warn(f"{ENV}={file}: entry {entry!r} is not a kernel config ({config!r}); ignored, the shape "
                          f"is tuned or picked as without the file", RuntimeWarning, stacklevel=3)
            return None
        return dict(config)


@contextlib.contextmanager
def _file_lock(file: str):
    """An exclusive lock on ``file + '.lock'`` across processes (POSIX; a no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # Windows: the thread lock only
        yield
        return
    with open(file + ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def record(file: str, entry: str, config: dict) -> None:
    """Add ``entry`` -> ``config`` to ``file``, keeping what is there (this or another process wrote)."""
    from cnnperf._io import write_json_atomic

    os.makedirs(os.path.dirname(os.path.abspath(file)), exist_ok=True)
    with _lock, _file_lock(file):
        entries = _read(file)
        entries[entry] = dict(config)
        write_json_atomic(file, {"schema": SCHEMA, "entries": dict(sorted(entries.items()))})
        _loaded[file] = (_stamp(file), entries, time.monotonic())
