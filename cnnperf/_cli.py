"""What every ``cnnperf`` subcommand shares: one way to run, typed options checked once, one console.

:func:`run` is the exit protocol of every subcommand: a bad command line is one line on stderr and exit status
2, ``--help`` exits 0, Ctrl-C exits 130 (the tools write what they have done before it reaches here). Options
are checked while parsing, by the converters below (``type=`` of argparse): a bad value names its option.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Callable, Sequence, TypeVar

Args = TypeVar("Args")

# The short names of the floating-point dtypes that every option taking a dtype accepts.
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}


class UsageError(Exception):
    """A bad command line: reported as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise UsageError (one line, exit 2) instead of printing the usage."""

    def error(self, message):  # argparse would print the whole usage block first
        raise UsageError(message)


def run(prog: str, argv: Sequence[str] | None, parse: Callable[[list[str]], Args],
        body: Callable[[Args], int | None], interrupted: str = "interrupted") -> int:
    """``body(parse(argv))``, with the exit protocol: UsageError (from parsing or from the body's own set-up)
    -> "``prog``: error: ..." on stderr and 2; ``--help`` -> 0; a KeyboardInterrupt that reaches here ->
    "``prog``: ``interrupted``" on stderr and 130 (the tools write what they have done before it does)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse(argv)
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help, --version
        return int(exc.code or 0)
    try:
        return int(body(args) or 0)
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130


# ---------------------------------------------------------------------------------------------------------
# Converters for argparse's type=: each returns the value or raises ArgumentTypeError ("argument --x: ...").
# ---------------------------------------------------------------------------------------------------------

def at_least(minimum: int, why: str = "") -> Callable[[str], int]:
    """An integer >= ``minimum``; ``why`` is added to the error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}{why}, got {value}")
        return value
    return parse


positive_int = at_least(1)
nonnegative_int = at_least(0)


def positive_float(text: str) -> float:
    """A finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def nonnegative_float(text: str) -> float:
    """A finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a non-negative number, got {text!r}")
    return value


def choice_list(allowed: Sequence[str], aliases: dict[str, str] | None = None) -> Callable[[str], list[str]]:
    """'a,b' or 'all' -> a list of names from ``allowed`` (``aliases`` map other spellings), in the order given."""
    aliases = aliases or {}

    def parse(text: str) -> list[str]:
        names = list(allowed) if text == "all" else [aliases.get(t.strip(), t.strip())
                                                     for t in text.split(",") if t.strip()]
        bad = [n for n in names if n not in allowed]
        if bad or not names:
            spellings = f" (or {', '.join(aliases)})" if aliases else ""
            raise argparse.ArgumentTypeError(f"must be 'all' or a comma list of {', '.join(allowed)}{spellings}; "
                                             f"got {text!r}")
        return list(dict.fromkeys(names))
    return parse


def dtype_name(allowed: Sequence[str]) -> Callable[[str], str]:
    """One floating-point dtype name of ``allowed`` ('bfloat16'), also spelled as in DTYPE_ALIASES ('bf16')."""
    def parse(text: str) -> str:
        name = DTYPE_ALIASES.get(text.lower(), text.lower())
        if name not in allowed:
            raise argparse.ArgumentTypeError(f"must be one of {', '.join(allowed)} (or "
                                             f"{', '.join(a for a, n in DTYPE_ALIASES.items() if n in allowed)}), "
                                             f"got {text!r}")
        return name
    return parse


def existing_dir(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not a directory")
    return path


def device(text: str):
    """A torch.device of a kind cnnperf runs on: cpu, cuda or cuda:N. Whether this machine has it is
    :func:`check_device`'s question, asked after parsing: a later ``--device`` on the command line overrides an
    earlier one (the GPU check's rehearsal relies on it), so an earlier one must not fail the parse."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text}: only cpu and cuda are supported")
    return dev


def check_device(dev, option: str = "--device"):
    """``dev`` if this machine has it; UsageError naming ``option`` otherwise."""
    import torch

    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{option} {dev}: no CUDA device is available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"{option} {dev}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def default_device():
    """cuda when a GPU is there, else cpu."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def join_torchrun(device):
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on a GPU, gloo on the CPU; a GPU rank takes
    cuda:LOCAL_RANK); returns (device, rank, world size, whether it joined here and so must leave)."""
    import os

    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return device, 0, 1, False
    joined = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        joined = True
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device, dist.get_rank(), dist.get_world_size(), joined
