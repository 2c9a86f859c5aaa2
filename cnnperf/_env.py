"""Facts about the machine and the software, as every record cnnperf writes carries them.

:func:`device_name`, :func:`device_slug` (file-name safe), :func:`cpu_count` (the CPUs this process may use),
:func:`versions` (of everything that decides the numbers) and :func:`record_header` (the fields every tool's JSON
record starts with). Imports torch only.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import re
import sys
from typing import Sequence

import torch

from cnnperf._version import __version__


def device_name(device: torch.device) -> str:
    """'NVIDIA H200' or 'NVIDIA H100 80GB HBM3', or for the CPU its model and the number of threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"CPU {model} ({torch.get_num_threads()} threads)"


def device_slug(name: str) -> str:
    """A file-name-safe form of a device name: 'NVIDIA H200' -> 'nvidia-h200'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60] or "device"


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _installed(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    """Versions of everything that decides the numbers (None where a component is absent). Read from the
    installed packages' metadata: nothing is imported for it (triton and scikit-learn take seconds to import)."""
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {"cnnperf": __version__, "torch": torch.__version__, "triton": _installed("triton"),
            "torchvision": _installed("torchvision"), "cuda": torch.version.cuda, "cudnn": cudnn,
            "numpy": _installed("numpy"), "sklearn": _installed("scikit-learn"),
            "python": platform.python_version()}


def utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def record_header(tool: str, device: torch.device, argv: Sequence[str] | None = None) -> dict:
    """The fields every JSON record a tool writes starts with: the tool, the device (name and type), the
    versions, the UTC time and the command line (``argv``, default this process's)."""
    return {"tool": tool, "device": device_name(device), "device_type": device.type, "versions": versions(),
            "timestamp": utc_now().isoformat(timespec="seconds"),
            "argv": list(sys.argv[1:] if argv is None else argv)}
