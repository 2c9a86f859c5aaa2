"""The conv kernels' tuned configs in a file a user can keep and ship: ``CNNPERF_CONFIG_CACHE=path.json``.

With the variable set, a config found in the file for this device, Triton version, kernel, dtype and shape is
launched as is (no tuning, the same every run, and usable inside CUDA-graph capture); with
``CNNPERF_AUTOTUNE=1`` a shape not in the file is autotuned once and its winner added to the file (written
atomically, merged with what other processes wrote meanwhile). Without the variable nothing is read or written.

The file is JSON: ``{"schema": "cnnperf.conv_configs/1", "entries": {key: config}}``; a key names the device,
the Triton version, the kernel (fwd, dgrad, wgrad), the dtype and the problem's sizes, so one file can hold
several GPUs and a Triton upgrade re-tunes instead of launching a config tuned for other code.
"""

from __future__ import annotations

import json
import os
import threading

SCHEMA = "cnnperf.conv_configs/1"
ENV = "CNNPERF_CONFIG_CACHE"

_lock = threading.Lock()
_loaded: dict[str, tuple[float, dict]] = {}  # path -> (mtime, entries)


def path() -> str | None:
    """The cache file named by ``CNNPERF_CONFIG_CACHE``, or None."""
    return os.environ.get(ENV) or None


def key(device: str, triton_version: str, kind: str, dtype: str, problem) -> str:
    """The entry's key: device, Triton version, kernel, dtype, then the problem's sizes (a perf_model.Conv)."""
    sizes = (f"n{problem.n} c{problem.c_in} h{problem.h} w{problem.w} k{problem.c_out} r{problem.kh}x{problem.kw}"
             f" s{problem.stride[0]}x{problem.stride[1]} p{problem.padding[0]}x{problem.padding[1]}"
             f" d{problem.dilation[0]}x{problem.dilation[1]} g{problem.groups} b{int(problem.has_bias)}")
    return f"{device} | triton {triton_version} | {kind} | {dtype} | {sizes}"


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


def lookup(file: str, entry: str) -> dict | None:
    """The config stored under ``entry`` in ``file`` (re-read when the file changed), or None."""
    with _lock:
        try:
            mtime = os.stat(file).st_mtime
        except FileNotFoundError:
            return None
        cached = _loaded.get(file)
        if cached is None or cached[0] != mtime:
            cached = (mtime, _read(file))
            _loaded[file] = cached
        config = cached[1].get(entry)
        return dict(config) if config is not None else None


def record(file: str, entry: str, config: dict) -> None:
    """Add ``entry`` -> ``config`` to ``file``, keeping what is there (this or another process wrote)."""
    from cnnperf._io import write_json_atomic

    with _lock:
        entries = _read(file)
        entries[entry] = dict(config)
        directory = os.path.dirname(os.path.abspath(file))
        os.makedirs(directory, exist_ok=True)
        write_json_atomic(file, {"schema": SCHEMA, "entries": dict(sorted(entries.items()))})
        _loaded[file] = (os.stat(file).st_mtime, entries)
