"""The ``cnnperf`` command: one subcommand per tool, each a ``main(argv) -> int`` in its own module."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module with main(argv) -> int, one-line help)
COMMANDS = {
    "doctor": ("cnnperf.doctor.cli", "train a CNN, watch its gradients and curves, and say what is wrong and what "
                                     "to change"),
    "profile": ("cnnperf.profiler.cli", "measure AMP, channels_last, torch.compile, fused layers, loader workers on "
                                        "one model, recommend the fastest sound set"),
    "audit": ("cnnperf.audit", "compile every Triton kernel for sm_80/sm_90 and check registers, spills, smem"),
    "bench": ("cnnperf.benchmarks.conv", "benchmark the fused conv layers against eager PyTorch and torch.compile"),
    "bench-clip": ("cnnperf.benchmarks.clip", "benchmark the fused gradient norm + clip against torch's "
                                              "clip_grad_norm_"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="cnnperf", description="Fast and healthy CNN training in PyTorch.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("command", nargs="?", choices=sorted(COMMANDS),
                        help="; ".join(f"{name}: {help}" for name, (_, help) in sorted(COMMANDS.items())))
    args, rest = parser.parse_known_args(argv[:1])
    if args.version:
        from cnnperf import __version__
        print(f"cnnperf {__version__}")
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
