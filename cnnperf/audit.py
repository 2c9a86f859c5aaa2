"""``cnnperf audit``: compile every Triton kernel in every config ahead of time for sm_80 and sm_90, no GPU needed.

For each (kernel, config, dtype, arch) it runs ``triton.compile`` on an ``ASTSource`` for
``GPUTarget("cuda", arch, 32)``, then reads the cubin with the ``cuobjdump`` shipped in Triton's wheel:
registers and spills (``-res-usage``: STACK or LOCAL > 0 bytes is a spill), shared memory (Triton's dynamic
allocation plus any static), and the tensor-core instructions in the SASS (``HMMA``: mma.sync, sm_80 and later;
``HGMMA``: wgmma, Hopper only; on sm_90 a kernel may legitimately use either, and the table says which).

The exit status is 1 when any row has a problem: a compile failure, a spill, shared memory over the
architecture's per-block limit, or (for a ``tl.dot`` kernel) no tensor-core instruction at all; 2 on a usage
error; 0 otherwise. The offending rows are listed after the table.

Adding a kernel means adding one :class:`KernelAudit` entry to :data:`KERNELS`.

**The specialization compiled.** Constexprs that are not tuned get the representative values in the entry
(e.g. a 3x3 filter with bias). Ints are ``i32``; pointers point to the audited dtype unless the entry says
otherwise (fp32 workspaces). Like a real launch on torch tensors, pointers carry ``tt.divisibility=16`` and so
do the ints the entry lists in ``divisible_by_16`` (channel counts and NHWC strides of a layer whose channel
counts are multiples of 16). This matters: without those hints Triton neither vectorises the loads nor
pipelines them with ``cp.async``, and registers and shared memory are not what the autotuner will launch
(measured: the forward 128x128x64 bf16 config uses 32 KB and spills without them, 64 KB and no spill with them).
``--generic-ints`` audits the other specialization, with no int divisible by 16 (a first layer with 3 input
channels); it is much slower to compile, because most GEMM configs spill there.

**Cost**: one compile per row; a re-run with nothing changed takes seconds (compiles and cubin inspections both
come from the cache).

**Why compiles run in worker processes.** ``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` on machines
without a GPU, and Triton reads the flag when ``@triton.jit`` runs: in such a process the kernels are
``InterpretedFunction`` objects that ``triton.compile`` cannot take. Re-wrapping ``kernel.fn`` with
``JITFunction`` is not enough: the ``@triton.jit`` helpers it calls (``_grouped_tile``) are interpreted too
("Unsupported function referenced: InterpretedFunction"). So every compile runs in a worker ``python`` started
with ``TRITON_INTERPRET=0`` in its environment, before it imports anything; the parent only reads the config
lists. Workers are plain subprocesses fed one job a line, not a ``multiprocessing`` pool: nothing depends on
the caller's ``__main__`` (spawn would re-run it), and a worker that crashes fails one row and is replaced.
The same path serves ``--jobs 1`` and ``--jobs N``, tests and CI. Each worker imports torch once (``cnnperf``
does). Triton caches compiles in ``~/.triton/cache`` (or ``TRITON_CACHE_DIR``); the
audit keeps its cubin inspection there too, so a re-run with nothing changed takes seconds.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import importlib
import json
import math
import os
import pickle
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Mapping, Sequence

from cnnperf import perf_model as pm

# ---------------------------------------------------------------------------------------------------------
# What is audited: one entry per kernel.
# ---------------------------------------------------------------------------------------------------------

DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}  # torch name -> Triton signature type
# The "dtype" of a kernel whose argument types are all fixed (e.g. it reads each tensor's dtype at run time):
# compiled once, and kept by every --dtype filter.
ANY_DTYPE = "any"


@dataclasses.dataclass(frozen=True)
class Arch:
    """A compile target: shared memory per block (bytes) and the tensor-core instruction it is expected to use."""
    capability: int
    smem_limit: int
    mma: str


ARCHS = {
    80: Arch(80, 163 * 1024, "HMMA"),  # A100 (sm_80): 163 KB of shared memory per block
    90: Arch(90, 227 * 1024, "HGMMA"),  # H100 and H200 (sm_90): 227 KB of shared memory per block
}
# SASS opcodes of the tensor cores (mma.sync, wgmma and their integer / fp8 / fp64 forms).
MMA_OPCODES = ("HMMA", "HGMMA", "IMMA", "IGMMA", "QGMMA", "DMMA")


@dataclasses.dataclass(frozen=True)
class KernelAudit:
    """How to audit one ``@triton.jit`` kernel.

    - ``module``, ``kernel``: where the kernel is (imported by name in the worker).
    - ``configs``: dtype name (or :data:`ANY_DTYPE`) -> the configs to compile for it: the name of a config
      list in ``module`` (``"FWD_CONFIGS_16"``), a function of the module that returns them, or the configs
      themselves. A config is a ``triton.Config`` or a dict of constexprs with optional ``num_warps`` /
      ``num_stages``; a single one may stand for a list of one.
    - ``constexprs``: representative values of the constexprs that are not tuned (``KH=3``, ``HAS_BIAS=True``).
    - ``dtype_constexprs``: dtype name -> more constexprs for that dtype (``INPUT_PRECISION``).
    - ``arg_types``: Triton types of arguments that do not follow the rule "``*_ptr`` points to the audited
      dtype, anything else is ``i32``": fp32 workspaces (``{"dw_ptr": "*fp32"}``), int64 tables, float
      scalars (``"fp32"``), bool tensors (``"*u1"``).
    - ``divisible_by_16``: int arguments a typical launch passes as multiples of 16 (see the module docstring).
    - ``tensor_cores``: the kernel calls ``tl.dot``: a row without any tensor-core instruction is a problem.
    - ``arch_constexprs``: arch -> constexprs that the launcher sets per architecture (``MASK_Y``).
    - ``variant``: names a second entry of the same kernel with other constexprs (``STATS``); it is appended
      to the rows' config labels.
    - ``min_arch``: compiled only for the architectures from this one on (the launcher runs it only there).
    """
    module: str
    kernel: str
    configs: Mapping[str, Any]
    constexprs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    dtype_constexprs: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    arg_types: Mapping[str, str] = dataclasses.field(default_factory=dict)
    divisible_by_16: Sequence[str] = ()
    tensor_cores: bool = False
    arch_constexprs: Mapping[int, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    variant: str = ""
    min_arch: int = 0


def _by_width(list_16: str, list_32: str) -> dict[str, str]:
    """16-bit dtypes share one config list, fp32 has its own."""
    return {"float16": list_16, "bfloat16": list_16, "float32": list_32}


# fp32 operands of tl.dot use TF32 on a GPU (the launcher follows torch.backends.cudnn.allow_tf32, on by default).
_DOT_PRECISION = {"float16": {"INPUT_PRECISION": "ieee"}, "bfloat16": {"INPUT_PRECISION": "ieee"},
                  "float32": {"INPUT_PRECISION": "tf32"}}
_CONV = "cnnperf.kernels.conv_bias_relu"
# dgrad and wgrad may apply the ReLU mask (and the wgrad sum the bias gradient) from sm_90 on (perf_model).
_MASK_BY_ARCH = {arch: dict.fromkeys(("MASK_Y", "BIAS_GRAD"), arch >= pm.MASK_IN_GEMMS_MIN_ARCH) for arch in ARCHS}
_CONV_CHANNELS = ("C_in", "C_out", "C_in_g", "C_out_g")
_NHWC_STRIDES = ("sxn", "sxh", "sxw")
_GRAD_NORM = "cnnperf.kernels.grad_norm"
_BN = "cnnperf.kernels.batch_norm_relu"


def _bn_dz_configs(kind: str) -> dict[str, Any]:
    """The configs of ``kind``'s lists (by width) that the model may pick for a GEMM computing the BatchNorm's
    dz (:func:`cnnperf.perf_model.choose_config` with ``bn_dz``: no spill predicted on sm_90, the only
    architecture it runs on)."""
    def fitting(name):
        return lambda module: [c for c in getattr(module, name) if pm.registers_estimate(
            pm.config_dict(c), True, 90, kind, bn_dz=True) <= 255 - pm.SPILL_MARGIN]
    prefix = f"{kind.upper()}_CONFIGS"
    return {dtype: fitting(name) for dtype, name in _by_width(f"{prefix}_16", f"{prefix}_32").items()}


def _types(triton_type: str, *names: str) -> dict[str, str]:
    return dict.fromkeys(names, triton_type)


def _grad_norm_chunk_config(module) -> dict[str, int]:
    """The config cnnperf/ops/grad_norm.py launches passes 1 and 4 with on a GPU."""
    return {"CHUNK": module.CHUNK, "BLOCK": module.BLOCK, "num_warps": module.NUM_WARPS}


# The gradient-norm kernels read each tensor's dtype from a table at run time: one compile covers them all.
_GRAD_TABLE = _types("*i64", "addr_ptr", "numel_ptr", "meta_ptr", "chunk_tensor_ptr", "chunk_start_ptr")

KERNELS: tuple[KernelAudit, ...] = (
    # Without and with the residual added before the ReLU (eval: a ResNet block's last conv, its BatchNorm folded).
    *(KernelAudit(_CONV, "_conv_bias_relu_fwd_kernel",
                  _by_width(*(f"FWD{'_RESIDUAL' if residual else ''}_CONFIGS_{bits}" for bits in (16, 32))),
                  constexprs={"KH": 3, "KW": 3, "HAS_BIAS": True, "EVEN_K": True, "EVEN_N": True, "FOLD_C": 0,
                              "SPLIT_K": 1, "STATS": False, "HAS_RESIDUAL": residual},
                  dtype_constexprs=_DOT_PRECISION, arg_types={"ws_ptr": "*fp32", "stats_ptr": "*fp32"},
                  divisible_by_16=_CONV_CHANNELS + _NHWC_STRIDES, tensor_cores=True,
                  variant="residual" if residual else "")
      for residual in (False, True)),
    # The forward of FusedConv2dBatchNormReLU: z and its per-tile BatchNorm statistics in the epilogue, no ReLU.
    KernelAudit(_CONV, "_conv_bias_relu_fwd_kernel", _by_width("FWD_STATS_CONFIGS_16", "FWD_STATS_CONFIGS_32"),
                constexprs={"KH": 3, "KW": 3, "HAS_BIAS": False, "EVEN_K": True, "EVEN_N": True, "FOLD_C": 0,
                            "SPLIT_K": 1, "STATS": True, "HAS_RESIDUAL": False},
                dtype_constexprs=_DOT_PRECISION, arg_types={"ws_ptr": "*fp32", "stats_ptr": "*fp32"},
                divisible_by_16=_CONV_CHANNELS + _NHWC_STRIDES, tensor_cores=True, variant="STATS"),
    KernelAudit(_CONV, "_relu_mask_bias_grad_kernel",
                {"float16": "MASK_CONFIG", "bfloat16": "MASK_CONFIG", "float32": "MASK_CONFIG"},
                constexprs={"COMPUTE_BIAS": True}, arg_types={"partial_ptr": "*fp32"},
                divisible_by_16=("C", "sgn", "sgp", "syn", "syp")),
    KernelAudit(_CONV, "_conv_dgrad_kernel", _by_width("DGRAD_CONFIGS_16", "DGRAD_CONFIGS_32"),
                constexprs={"KH": 3, "KW": 3, "EVEN_K": True, "SPLIT_K": 1, "BN_GRAD": False},
                dtype_constexprs=_DOT_PRECISION,
                arg_types={"ws_ptr": "*fp32", "chan_ptr": "*fp32"},
                divisible_by_16=_CONV_CHANNELS, tensor_cores=True,
                arch_constexprs={a: {"MASK_Y": c["MASK_Y"]} for a, c in _MASK_BY_ARCH.items()}),
    KernelAudit(_CONV, "_conv_wgrad_kernel", _by_width("WGRAD_CONFIGS_16", "WGRAD_CONFIGS_32"),
                constexprs={"KH": 3, "KW": 3, "FOLD_C": 0, "BN_GRAD": False},
                dtype_constexprs=_DOT_PRECISION, arg_types={"dw_ptr": "*fp32", "db_ptr": "*fp32", "chan_ptr": "*fp32"},
                divisible_by_16=_CONV_CHANNELS + _NHWC_STRIDES, tensor_cores=True, arch_constexprs=_MASK_BY_ARCH),
    # FusedConv2dBatchNormReLU's backward GEMMs computing the BatchNorm's input gradient as they load grad_out
    # and z (the ReLU's mask recomputed from z), in place of a dz pass: the configs the model may pick for them.
    KernelAudit(_CONV, "_conv_dgrad_kernel", _bn_dz_configs("dgrad"),
                constexprs={"KH": 3, "KW": 3, "EVEN_K": True, "SPLIT_K": 1, "BN_GRAD": True, "MASK_Y": True},
                dtype_constexprs=_DOT_PRECISION, arg_types={"ws_ptr": "*fp32", "chan_ptr": "*fp32"},
                divisible_by_16=_CONV_CHANNELS, tensor_cores=True, variant="BN", min_arch=pm.BN_DZ_MIN_ARCH),
    KernelAudit(_CONV, "_conv_wgrad_kernel", _bn_dz_configs("wgrad"),
                constexprs={"KH": 3, "KW": 3, "FOLD_C": 0, "BN_GRAD": True, "MASK_Y": True, "BIAS_GRAD": False},
                dtype_constexprs=_DOT_PRECISION, arg_types={"dw_ptr": "*fp32", "db_ptr": "*fp32", "chan_ptr": "*fp32"},
                divisible_by_16=_CONV_CHANNELS + _NHWC_STRIDES, tensor_cores=True, variant="BN",
                min_arch=pm.BN_DZ_MIN_ARCH),
    *(KernelAudit(_CONV, "_split_k_sum_kernel", _by_width("SPLIT_K_SUM_CONFIG", "SPLIT_K_SUM_CONFIG"),
                  constexprs={"HAS_BIAS": True, "RELU": True, "WEIGHT": False, "HAS_RESIDUAL": residual},
                  arg_types={"ws_ptr": "*fp32"}, divisible_by_16=("C", "s_r"), variant="residual" if residual else "")
      for residual in (False, True)),
    # The BatchNorm + ReLU passes, without and with the residual add (a ResNet block's last conv).
    *(KernelAudit(_BN, kernel, _by_width("CONFIG", "CONFIG"), constexprs={"HAS_RESIDUAL": residual},
                  arg_types=types, divisible_by_16=divisible, variant="residual" if residual else "")
      for kernel, types, divisible in (
          ("_batch_norm_relu_kernel", {"chan_ptr": "*fp32"}, ("C",)),
          ("_batch_norm_relu_grad_sums_kernel", {"chan_ptr": "*fp32", "partial_ptr": "*fp32"}, ("C", "sgn", "sgp")),
          ("_batch_norm_relu_grad_kernel", {"chan_ptr": "*fp32"}, ("C", "sgn", "sgp")))
      for residual in (False, True)),
    # The per-channel finalizations: the forward's statistics from the conv's tiles (fp64 inside) and the channel
    # table (gamma and beta in the dtype under test: a model in .half()), or the backward's table from the saved
    # statistics; the backward's sums and coefficients.
    *(KernelAudit(_BN, "_batch_norm_statistics_kernel", _by_width("FINALIZE_CONFIG", "FINALIZE_CONFIG"),
                  constexprs={"FROM_TILES": from_tiles, "HAS_WEIGHT": True, "HAS_BIAS": True},
                  arg_types={**_types("*fp32", "stats_ptr", "mean_ptr", "var_ptr", "chan_ptr"), "eps": "fp32"},
                  divisible_by_16=("C",), variant="tiles" if from_tiles else "")
      for from_tiles in (True, False)),
    KernelAudit(_BN, "_batch_norm_grad_coefficients_kernel", {ANY_DTYPE: "FINALIZE_CONFIG"},
                arg_types=_types("*fp32", "partial_ptr", "chan_ptr", "sums_ptr"), divisible_by_16=("C",)),
    KernelAudit(_GRAD_NORM, "_grad_norm_partial_kernel", {ANY_DTYPE: _grad_norm_chunk_config},
                constexprs={"NORM_INF": False}, arg_types={**_GRAD_TABLE, "partial_ptr": "*fp32"}),
    KernelAudit(_GRAD_NORM, "_grad_norm_reduce_kernel", {ANY_DTYPE: lambda k: {"BLOCK_C": k.REDUCE_BLOCK_C}},
                constexprs={"NORM_INF": False},
                arg_types={**_types("*fp32", "partial_ptr", "acc_ptr"), "chunk_begin_ptr": "*i64"}),
    KernelAudit(_GRAD_NORM, "_grad_norm_finalize_kernel", {ANY_DTYPE: lambda k: {"BLOCK_T": k.FINALIZE_BLOCK_T}},
                constexprs={"NORM_INF": False, "HAS_SCALE": True, "ROUND_TOTAL": 1},
                arg_types={**_types("*fp32", "acc_ptr", "norms_ptr", "total_ptr", "coef_ptr", "scale_ptr"),
                           "finite_ptr": "*u1", "max_norm": "fp32"}),
    KernelAudit(_GRAD_NORM, "_grad_scale_kernel", {ANY_DTYPE: _grad_norm_chunk_config},
                arg_types={**_GRAD_TABLE, "coef_ptr": "*fp32"}),
)


# ---------------------------------------------------------------------------------------------------------
# Jobs (one compile each, sent to a worker) and rows (one result each).
# ---------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Job:
    module: str
    kernel: str
    dtype: str
    arch: int
    config: str  # label, e.g. "128x128x64 GROUP_M=8 w8 s3"
    constexprs: Mapping[str, Any]  # all of them: the entry's, the dtype's and the config's
    options: Mapping[str, int]  # num_warps, num_stages (only those the config sets)
    arg_types: Mapping[str, str]
    divisible_by_16: tuple[str, ...]
    tensor_cores: bool
    sass_dir: str | None = None
    ones: tuple[str, ...] = ()  # int arguments equal to 1 at launch: Triton compiles them as constexpr 1


@dataclasses.dataclass
class Row:
    """One compiled (kernel, config, dtype, arch); ``problems`` is empty when it passes."""
    kernel: str
    config: str
    dtype: str
    arch: int
    num_warps: int | None = None
    num_stages: int | None = None
    registers: int | None = None
    stack_bytes: int | None = None
    local_bytes: int | None = None
    shared_bytes: int | None = None
    shared_limit: int = 0
    mma: dict[str, int] = dataclasses.field(default_factory=dict)  # tensor-core opcode -> count in the SASS
    mainloop_instructions: int | None = None  # SASS instructions in the loop that holds the MMAs (per warp)
    mainloop_mma: int | None = None  # tensor-core instructions in that loop
    compile_s: float = 0.0
    error: str | None = None
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _normalize_configs(value) -> list[tuple[dict, dict]]:
    """[(constexprs, options)] from a triton.Config, a dict, or a list of either."""
    if isinstance(value, (list, tuple)):
        return [c for v in value for c in _normalize_configs(v)]
    if isinstance(value, Mapping):
        params = dict(value)
        options = {k: params.pop(k) for k in ("num_warps", "num_stages") if k in params}
        return [(params, options)]
    options = {"num_warps": value.num_warps, "num_stages": value.num_stages}
    if getattr(value, "maxnreg", None) is not None:
        options["maxnreg"] = value.maxnreg
    return [(dict(value.kwargs), options)]


def resolve_configs(module_name: str, configs):
    """An entry's configs for one dtype: a config list's name or a function of the module, resolved."""
    if isinstance(configs, str):
        return getattr(importlib.import_module(module_name), configs)
    if callable(configs) and not isinstance(configs, Mapping):
        return configs(importlib.import_module(module_name))
    return configs


def config_label(params: Mapping[str, Any], options: Mapping[str, int]) -> str:
    """``BLOCK_*`` values joined by x (if more than one), the other constexprs, warps and stages.

    ``64x64x32 GROUP_M=8 w4 s4``, ``BLOCK_T=128``, ``CHUNK=65536 BLOCK=2048 w8``.
    """
    blocks = [str(v) for k, v in params.items() if k.startswith("BLOCK_")]
    others = [f"{k}={v}" for k, v in params.items() if not k.startswith("BLOCK_") or len(blocks) == 1]
    blocks = blocks if len(blocks) > 1 else []
    tail = [f"w{options['num_warps']}"] if "num_warps" in options else []
    tail += [f"s{options['num_stages']}"] if "num_stages" in options else []
    tail += [f"r{options['maxnreg']}"] if "maxnreg" in options else []
    return " ".join(filter(None, ["x".join(blocks)] + others + tail))


def plan(kernels: Sequence[KernelAudit] = KERNELS, archs: Sequence[int] = tuple(ARCHS),
         dtypes: Sequence[str] | None = None, kernel_filter: str | None = None,
         config_filter: str | None = None, sass_dir: str | None = None, generic_ints: bool = False) -> list[Job]:
    """The compile jobs, in table order: kernel, dtype, config, arch. Filters match substrings.

    ``generic_ints``: compile the specialization for ints that are not multiples of 16 (no divisibility hint
    on any int; pointers stay 16-byte aligned), e.g. a first layer with 3 input channels.
    """
    jobs = []
    for entry in kernels:
        if kernel_filter and kernel_filter not in entry.kernel:
            continue
        for dtype, configs in entry.configs.items():
            if dtypes is not None and dtype not in dtypes and dtype != ANY_DTYPE:
                continue
            for params, options in _normalize_configs(resolve_configs(entry.module, configs)):
                label = config_label(params, options) + (f" {entry.variant}" if entry.variant else "")
                if config_filter and config_filter not in label:
                    continue
                constexprs = {**entry.constexprs, **entry.dtype_constexprs.get(dtype, {}), **params}
                for arch in (a for a in archs if a >= entry.min_arch):
                    jobs.append(Job(entry.module, entry.kernel, dtype, arch, label,
                                    {**constexprs, **entry.arch_constexprs.get(arch, {})}, options,
                                    dict(entry.arg_types), () if generic_ints else tuple(entry.divisible_by_16),
                                    entry.tensor_cores, sass_dir))
    return jobs


# ---------------------------------------------------------------------------------------------------------
# The worker side: compile one job and read the cubin.
# ---------------------------------------------------------------------------------------------------------


def _load_kernel(job: Job):
    from triton.runtime.jit import JITFunction

    kernel = getattr(importlib.import_module(job.module), job.kernel)
    if not isinstance(kernel, JITFunction):
        raise TypeError(f"{job.module}.{job.kernel} is a {type(kernel).__name__}, not a triton JITFunction "
                        f"(imported with TRITON_INTERPRET=1 before the audit worker started?)")
    return kernel


def _specialization(kernel, job: Job) -> tuple[dict[str, str], dict[str, Any], dict]:
    """(signature, constexprs, attrs) of the ASTSource for ``job``."""
    signature, attrs, constexprs = {}, {}, dict(job.constexprs)
    params = [p.name for p in kernel.params]
    unknown = (set(job.constexprs) | set(job.arg_types) | set(job.divisible_by_16) | set(job.ones)) - set(params)
    if unknown:
        raise ValueError(f"{job.kernel} has no argument(s) {sorted(unknown)} (named in its audit entry or config)")
    for i, p in enumerate(kernel.params):
        if p.is_constexpr:
            if p.name not in job.constexprs:
                raise ValueError(f"{job.kernel}: constexpr {p.name} has no value in its audit entry or config")
            signature[p.name] = "constexpr"
            continue
        if p.name in job.ones:  # what the launcher's specialization does with an int equal to 1
            signature[p.name] = "constexpr"
            constexprs[p.name] = 1
            continue
        if p.name in job.arg_types:
            signature[p.name] = job.arg_types[p.name]
        elif p.name.endswith("_ptr"):
            if job.dtype not in DTYPES:
                raise ValueError(f"{job.kernel}: pointer {p.name} needs a type in its audit entry's arg_types "
                                 f"(dtype {job.dtype!r} says nothing about it)")
            signature[p.name] = "*" + DTYPES[job.dtype]
        else:
            signature[p.name] = "i32"
        if signature[p.name].startswith("*") or p.name in job.divisible_by_16:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


_RES_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_SASS_OPCODE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T\d]+\s+)?([A-Z][A-Z0-9]*)")


def parse_res_usage(text: str) -> dict[str, int]:
    """Registers, stack, static shared and local bytes from ``cuobjdump -res-usage`` (the kernel's line)."""
    match = _RES_USAGE.search(text)
    if match is None:
        raise ValueError(f"no resource usage line in cuobjdump output:\n{text}")
    reg, stack, shared, local = map(int, match.groups())
    return {"registers": reg, "stack_bytes": stack, "static_shared": shared, "local_bytes": local}


def count_mma(sass: str) -> dict[str, int]:
    """Tensor-core opcode -> number of instructions in a ``cuobjdump -sass`` listing."""
    counts: dict[str, int] = {}
    for opcode in _SASS_OPCODE.findall(sass):
        if opcode in MMA_OPCODES:
            counts[opcode] = counts.get(opcode, 0) + 1
    return counts


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T\d]+\s+)?([A-Z][A-Z0-9.]*)([^;]*);")


def mainloop(sass: str) -> tuple[int, int] | None:
    """(instructions, tensor-core instructions) of the innermost loop that holds tensor-core instructions.

    A loop is a backward branch (``BRA`` to a lower address); its body is every instruction from the target to
    the branch, both included (16 bytes each). Of the loops that hold MMAs the shortest is the K loop. None
    when no loop holds one (the kernel has no ``tl.dot``, or its loop was unrolled away).
    """
    lines = [(int(addr, 16), op.split(".")[0], rest) for addr, op, rest in _SASS_LINE.findall(sass)]
    best = None
    for addr, op, rest in lines:
        if op != "BRA":
            continue
        target = re.search(r"0x([0-9a-f]+)", rest)
        if target is None or int(target.group(1), 16) >= addr:
            continue
        start = int(target.group(1), 16)
        mma = sum(1 for a, o, _ in lines if start <= a <= addr and o in MMA_OPCODES)
        size = (addr - start) // 16 + 1
        if mma and (best is None or size < best[0]):
            best = (size, mma)
    return best


def _cuobjdump(flag: str, path: str) -> str:
    from triton import knobs

    done = subprocess.run([knobs.nvidia.cuobjdump.path, flag, path], capture_output=True, text=True, check=True)
    return done.stdout


def compile_job(job: Job) -> Row:
    """Compile ``job`` and measure it; an exception becomes the row's ``error``, never a crash."""
    row = Row(job.kernel, job.config, job.dtype, job.arch, shared_limit=ARCHS[job.arch].smem_limit)
    start = time.perf_counter()
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        kernel = _load_kernel(job)
        signature, constexprs, attrs = _specialization(kernel, job)
        src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", job.arch, 32), options=dict(job.options))
        row.compile_s = time.perf_counter() - start
        row.num_warps, row.num_stages = compiled.metadata.num_warps, compiled.metadata.num_stages
        usage = _inspect(compiled, job)
        row.registers, row.stack_bytes, row.local_bytes = (usage["registers"], usage["stack_bytes"],
                                                           usage["local_bytes"])
        row.shared_bytes = compiled.metadata.shared + usage["static_shared"]
        row.mma = usage["mma"]
        if usage["mainloop"] is not None:
            row.mainloop_instructions, row.mainloop_mma = usage["mainloop"]
    except Exception as exc:  # reported as a failed row, with the message
        row.compile_s = time.perf_counter() - start
        row.error = f"{type(exc).__name__}: {_first_lines(str(exc))}"
    return row


_INSPECTION = "cnnperf_audit_inspection_v2.json"  # bump the version when what is stored changes


def _inspect(compiled, job: Job) -> dict[str, Any]:
    """Resource usage and tensor-core opcode counts of a compiled kernel, read from its cubin.

    Disassembly costs about 0.6 s a kernel (nvdisasm's start-up), more than a cached compile, so the result
    is kept next to the compiled kernel in Triton's cache, under the same key (source, options, target and
    Triton version). With ``--sass-dir`` the cubin is always disassembled, to write the listing.
    """
    from triton.runtime.cache import get_cache_manager

    cache = get_cache_manager(compiled.metadata.hash)
    cached = cache.get_file(_INSPECTION)
    if cached is not None and job.sass_dir is None:
        with open(cached) as f:
            return json.load(f)
    with tempfile.TemporaryDirectory(prefix="cnnperf-audit-") as tmp:
        stem = os.path.join(job.sass_dir or tmp, f"{job.kernel}.{job.dtype}.sm{job.arch}.{_slug(job.config)}")
        with open(stem + ".cubin", "wb") as f:
            f.write(compiled.asm["cubin"])
        usage: dict[str, Any] = parse_res_usage(_cuobjdump("-res-usage", stem + ".cubin"))
        sass = _cuobjdump("-sass", stem + ".cubin")
        if job.sass_dir:
            with open(stem + ".sass", "w") as f:
                f.write(sass)
    usage["mma"] = count_mma(sass)
    usage["mainloop"] = mainloop(sass)
    cache.put(json.dumps(usage), _INSPECTION, binary=False)
    return usage


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_")


def _first_lines(text: str, n: int = 6) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return "\n".join(lines[:n] + (["..."] if len(lines) > n else []))


# ---------------------------------------------------------------------------------------------------------
# The parent side: run the jobs, judge the rows, print and write them.
# ---------------------------------------------------------------------------------------------------------

def judge(row: Row, tensor_cores: bool) -> Row:
    """Fill ``row.problems``: compile failure, spill, shared memory over the limit, no tensor cores."""
    row.problems = []
    if row.error is not None:
        row.problems.append(f"compile failed: {row.error}")
        return row
    if row.stack_bytes or row.local_bytes:
        row.problems.append(f"spill: STACK {row.stack_bytes} B, LOCAL {row.local_bytes} B")
    if row.shared_bytes > row.shared_limit:
        row.problems.append(f"shared memory {row.shared_bytes} B > sm_{row.arch} limit {row.shared_limit} B")
    if tensor_cores and not row.mma:
        row.problems.append(f"no tensor-core instruction in the SASS (expected {ARCHS[row.arch].mma})")
    return row


def run_jobs(jobs: Sequence[Job], n_jobs: int = 1, progress=None) -> list[Row]:
    """Compile ``jobs`` in ``n_jobs`` worker processes; rows come back judged, in job order.

    Each worker is a ``python`` started with ``TRITON_INTERPRET=0`` that takes jobs as JSON lines on stdin
    and answers rows on stdout (see :func:`_serve`); its stderr goes to a log file. A worker that dies (a
    crash in ptxas or LLVM, killed for memory) fails its job with the end of its log and is replaced.
    """
    if not jobs:
        return []
    rows: list[Row | None] = [None] * len(jobs)
    # Largest tiles first, so that the slowest compiles do not all land at the end.
    todo: queue.Queue[int] = queue.Queue()
    for i in sorted(range(len(jobs)), key=lambda i: -_cost(jobs[i])):
        todo.put(i)
    lock = threading.Lock()

    def finish(i: int, row: Row) -> None:
        rows[i] = judge(row, jobs[i].tensor_cores)
        if progress is not None:
            with lock:
                progress()

    def drain() -> None:
        worker, deaths = None, 0
        try:
            while deaths < _MAX_DEATHS:  # in a row: past that, a new worker would die too
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    return
                worker = worker or _Worker()
                row = worker.run(jobs[i])
                if row is None:  # the worker died on this job
                    status = worker.close()
                    row = _failed(jobs[i], f"worker died (exit status {status}); its log ends:\n{worker.log_tail}")
                    worker, deaths = None, deaths + 1
                else:
                    deaths = 0
                finish(i, row)
        finally:
            if worker is not None:
                worker.close()

    threads = [threading.Thread(target=drain, daemon=True) for _ in range(max(1, min(n_jobs, len(jobs))))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, row in enumerate(rows):  # left over when every thread gave up
        if row is None:
            rows[i] = judge(_failed(jobs[i], f"not compiled: workers died on {_MAX_DEATHS} jobs in a row"),
                            jobs[i].tensor_cores)
    return rows  # type: ignore[return-value]


_MAX_DEATHS = 3


def _failed(job: Job, error: str) -> Row:
    return Row(job.kernel, job.config, job.dtype, job.arch, shared_limit=ARCHS[job.arch].smem_limit, error=error)


class _Worker:
    """One worker process (see :func:`_serve`), fed one job at a time."""

    def __init__(self):
        self._log = tempfile.TemporaryFile(mode="w+", prefix="cnnperf-audit-worker-")
        # The flag is in the environment before the worker imports anything: its kernels are JITFunctions.
        env = {**os.environ, "TRITON_INTERPRET": "0",
               "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # what this process imports, it does
        self._proc = subprocess.Popen([sys.executable, "-c", "from cnnperf.audit import _serve; _serve()"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                      text=True, env=env)
        self.done = 0
        self.log_tail = ""

    def run(self, job: Job) -> Row | None:
        """The row of ``job``, or None when the worker died."""
        # A pickled dict, not the Job: under `python -m cnnperf.audit` its class would be __main__.Job, unknown to
        # the worker; and not JSON: a constexpr may be a Triton object (tl.float32).
        try:
            self._proc.stdin.write(base64.b64encode(pickle.dumps(dataclasses.asdict(job))).decode() + "\n")
            self._proc.stdin.flush()
            line = self._proc.stdout.readline()
        except (BrokenPipeError, OSError):
            return None
        if not line:
            return None
        self.done += 1
        return Row(**json.loads(line))

    def close(self) -> int | None:
        """Stop the worker; its exit status. The last lines of its log stay in ``log_tail``."""
        if self._proc.poll() is None:
            try:
                self._proc.stdin.close()
                self._proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
        for stream in (self._proc.stdin, self._proc.stdout):
            with contextlib.suppress(OSError):
                stream.close()
        if not self._log.closed:
            self._log.seek(0)
            self.log_tail = "\n".join(self._log.read().splitlines()[-20:])
            self._log.close()
        return self._proc.returncode


def _serve() -> None:
    """Worker loop: a pickled :class:`Job` dict per line on stdin, its :class:`Row` as a JSON line on stdout."""
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else printed (Triton prints the PTX of a failed ptxas run) goes to the log
    for line in sys.stdin:
        row = compile_job(Job(**pickle.loads(base64.b64decode(line))))
        protocol.write(json.dumps(dataclasses.asdict(row)) + "\n")


def _cost(job: Job) -> int:
    """A rough compile cost for scheduling: tile size times stages."""
    tile = math.prod(v for k, v in job.constexprs.items() if k.startswith("BLOCK_") and isinstance(v, int))
    return tile * job.options.get("num_stages", 3)


def summary(rows: Sequence[Row], seconds: float, n_jobs: int) -> dict[str, Any]:
    kernels = sorted({r.kernel for r in rows})
    return {
        "compiled": sum(r.error is None for r in rows),
        "rows": len(rows),
        "kernels": len(kernels),
        "failures": sum(r.error is not None for r in rows),
        "spills": sum(bool(r.stack_bytes or r.local_bytes) for r in rows),
        "smem_over_limit": sum(r.shared_bytes is not None and r.shared_bytes > r.shared_limit for r in rows),
        "no_tensor_cores": sum(any(p.startswith("no tensor-core") for p in r.problems) for r in rows),
        "max_registers": max((r.registers or 0 for r in rows), default=0),
        "seconds": round(seconds, 1),
        "jobs": n_jobs,
    }


def summary_line(s: Mapping[str, Any]) -> str:
    return (f"audit: {s['compiled']}/{s['rows']} kernel x config x dtype x arch compiled ({s['kernels']} kernels) "
            f"in {s['seconds']:.1f} s with {s['jobs']} jobs: {s['failures']} compile failures, {s['spills']} spills, "
            f"{s['smem_over_limit']} smem over limit, {s['no_tensor_cores']} without tensor cores; "
            f"max {s['max_registers']} registers")


def write_json(path: str, rows: Sequence[Row], summary_: Mapping[str, Any]) -> None:
    """Write the versions, the summary and the rows to ``path`` as JSON, atomically."""
    from cnnperf._env import versions
    from cnnperf._io import write_json_atomic

    write_json_atomic(path, {"versions": versions(), "summary": dict(summary_),
                             "rows": [{**dataclasses.asdict(r), "ok": r.ok} for r in rows]})


def render(rows: Sequence[Row], console, specialization: str = "") -> None:
    from rich.table import Table

    table = Table(title=f"Triton kernel audit: ahead-of-time compile, no GPU; {specialization}".rstrip("; "))
    for name, justify in (("kernel", "left"), ("config", "left"), ("dtype", "left"), ("arch", "right"),
                          ("regs", "right"), ("spill B", "right"), ("smem KB", "right"), ("tensor cores", "left"),
                          ("compile s", "right"), ("status", "left")):
        table.add_column(name, justify=justify, no_wrap=name != "status")
    for r in rows:
        failed = r.error is not None
        spill = (r.stack_bytes or 0) + (r.local_bytes or 0)
        status = "ok" if r.ok else "; ".join(p.split(":")[0] if p.startswith("compile failed") else p
                                              for p in r.problems)
        table.add_row(
            r.kernel, r.config, r.dtype, f"sm_{r.arch}",
            "-" if failed else str(r.registers),
            "-" if failed else str(spill),
            "-" if failed else f"{r.shared_bytes / 1024:.1f}",
            "-" if failed else (", ".join(f"{k} {v}" for k, v in sorted(r.mma.items())) or "none"),
            f"{r.compile_s:.1f}",
            status,
            style=None if r.ok else "bold red",
        )
    console.print(table)


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    from cnnperf import _cli
    from cnnperf._env import cpu_count

    parser = _cli.Parser(
        prog="cnnperf audit",
        description="Compile every Triton kernel in every config ahead of time for sm_80/sm_90 (no GPU needed) "
                    "and check registers, spills, shared memory and tensor-core instructions. Exit status 1 on "
                    "a compile failure, a spill, shared memory over the limit, or a tl.dot kernel without "
                    "tensor-core instructions.")
    parser.add_argument("--arch", choices=("80", "90", "both"), default="both", help="target (default: both)")
    parser.add_argument("--kernel", metavar="NAME", help="only kernels whose name contains NAME")
    parser.add_argument("--dtype", metavar="DTYPE", type=_cli.dtype_name(DTYPES),
                        help="only this dtype: float16/fp16, bfloat16/bf16, float32/fp32 (kernels compiled once "
                             f"for every dtype, shown as {ANY_DTYPE!r}, are kept)")
    parser.add_argument("--config", metavar="TEXT", help="only configs whose label contains TEXT, e.g. '64x64x32'")
    parser.add_argument("--jobs", "-j", type=_cli.positive_int, default=cpu_count(),
                        help="compile in N worker processes (default: the CPUs available, %(default)s here)")
    parser.add_argument("--json", metavar="PATH", help="also write the table and summary as JSON (atomically)")
    parser.add_argument("--sass-dir", metavar="DIR", help="keep each cubin and its SASS listing in DIR")
    parser.add_argument("--model", choices=("resnet50", "vgg16"),
                        help="instead of the config lists: the static performance model of the conv kernels on "
                             "this model's layers (what would launch, per layer and pass; see cnnperf/perf_model.py)")
    parser.add_argument("--batch", type=_cli.positive_int, default=32, help="batch size for --model (default 32)")
    parser.add_argument("--compare", metavar="BENCH_JSON",
                        help="the performance model against a `cnnperf bench` record (a GPU run, --backend triton): "
                             "measured and predicted time per layer and pass, and the model's error")
    parser.add_argument("--generic-ints", action="store_true",
                        help="audit the specialization for channel counts and strides that are not multiples of "
                             "16 (e.g. a first layer with 3 input channels) instead of the usual one")
    return parser.parse_args(argv)


@contextlib.contextmanager
def _progress(total: int):
    """A progress bar on stderr when it is a terminal (a compile can take 10 s); nothing in CI logs."""
    from rich.progress import Progress

    from cnnperf._terminal import make_console

    console = make_console(stderr=True)
    if not console.is_terminal:
        yield None
        return
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("compiling", total=total)
        yield lambda: progress.advance(task)


def main(argv: Sequence[str] | None = None, *, kernels: Sequence[KernelAudit] = KERNELS) -> int:
    """Run the audit; ``kernels`` replaces the registry (tests audit synthetic entries through it)."""
    from cnnperf import _cli

    return _cli.run("cnnperf audit", argv, _parse_args, lambda args: _audit(args, kernels))


def _audit(args: argparse.Namespace, kernels: Sequence[KernelAudit]) -> int:
    from cnnperf._cli import UsageError
    from cnnperf._terminal import make_console

    console = make_console()
    if args.model and args.compare:
        raise UsageError("--model and --compare exclude each other (--compare reads the models from the record)")
    if args.model:
        return _audit_model(args, console)
    if args.compare:
        return _audit_compare(args, console)
    archs = tuple(ARCHS) if args.arch == "both" else (int(args.arch),)
    if args.sass_dir:
        os.makedirs(args.sass_dir, exist_ok=True)
    jobs = plan(kernels, archs, None if args.dtype is None else (args.dtype,), args.kernel, args.config,
                os.path.abspath(args.sass_dir) if args.sass_dir else None, args.generic_ints)
    if not jobs:
        names = ", ".join(k.kernel for k in kernels)
        console.print(f"cnnperf audit: nothing matches --kernel {args.kernel!r} --dtype {args.dtype!r} "
                      f"--config {args.config!r}; kernels: {names}", style="red", markup=False)
        return 2

    start = time.perf_counter()
    with _progress(len(jobs)) as advance:
        rows = run_jobs(jobs, args.jobs, progress=advance)
    stats = summary(rows, time.perf_counter() - start, min(args.jobs, len(jobs)))
    stats["specialization"] = ("no int divisible by 16 (--generic-ints)" if args.generic_ints
                               else "channel counts and strides divisible by 16")

    render(rows, console, stats["specialization"])
    bad = [r for r in rows if not r.ok]
    if bad:
        console.print(f"{len(bad)} offending rows:", style="bold red")
        for r in bad:
            for problem in r.problems:
                console.print(f"  {r.kernel} [{r.config}] {r.dtype} sm_{r.arch}: {problem}", markup=False)
    if args.json:
        write_json(args.json, rows, stats)
    console.print(summary_line(stats), markup=False)
    return 1 if bad else 0


def compile_passes(passes, n_jobs: int) -> dict:
    """Compile the distinct jobs of ``passes`` (audit_model.LayerPass) in ``n_jobs`` workers: their rows by job
    key, for audit_model.model_rows."""
    from cnnperf import audit_model as am

    jobs = am.unique_jobs(passes)
    with _progress(len(jobs)) as advance:
        rows = run_jobs(jobs, n_jobs, progress=advance)
    return {am._job_key(j): r for j, r in zip(jobs, rows)}


def _audit_compare(args: argparse.Namespace, console) -> int:
    """``--compare BENCH_JSON``: compile what the record's layers ran, predict, set against the measurements."""
    from cnnperf import audit_model as am
    from cnnperf._cli import UsageError
    from cnnperf._io import write_json_atomic

    try:
        with open(args.compare) as f:
            record = json.load(f)
        device = record["rows"][0]["device"] if record.get("rows") else record.get("device", "")
        record["config"]["models"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"--compare {args.compare}: not a readable `cnnperf bench` record ({e})") from e
    arch = int(args.arch) if args.arch != "both" else am.arch_of(device)
    if arch is None:
        raise UsageError(f"--compare: the record's device {device!r} is not one the model knows; pass --arch 80 or 90")
    passes = am.compare_plan(record, arch)
    compiled = compile_passes(passes, args.jobs)
    rows_ = am.compare_rows(record, am.model_rows(passes, compiled, arch))
    summary_ = am.compare_summary(rows_)
    am.render_compare(rows_, summary_, console, f"Performance model (sm_{arch}) against {args.compare} "
                                                f"({device}, batch {record['config']['batch']})")
    if not rows_:
        console.print("no timed Triton rows in the record (run `cnnperf bench --backend triton` on a GPU)",
                      style="yellow", markup=False)
    if args.json:
        from cnnperf._env import versions

        write_json_atomic(args.json, {"versions": versions(), "bench_record": args.compare, "device": device,
                                      "arch": arch, "summary": summary_, "rows": rows_})
    return 0 if rows_ else 1


def _audit_model(args: argparse.Namespace, console) -> int:
    """``--model``: compile what the launcher would run on each layer, apply the performance model."""
    from cnnperf import audit_model as am
    from cnnperf._io import write_json_atomic

    archs = (90, 80) if args.arch == "both" else (int(args.arch),)
    dtype = args.dtype or "bfloat16"
    start = time.perf_counter()
    records, bad = [], []
    for arch in archs:
        passes = am.plan_model(args.model, args.batch, dtype, arch)
        probe = am.probe_pass(args.model, args.batch, dtype, arch)
        compiled = compile_passes(passes + ([probe] if probe else []), args.jobs)
        bad += [r for r in compiled.values() if not r.ok]
        model_rows = am.model_rows(passes, compiled, arch)
        probe_row = am.model_rows([probe], compiled, arch)[0] if probe else None
        stats = am.summarize(model_rows, probe_row)
        am.render(model_rows, stats, console, f"Performance model: {args.model} batch {args.batch} {dtype} sm_{arch} "
                                              f"({len(compiled)} kernels compiled)")
        records.append({"arch": arch, "gpu": dataclasses.asdict(am.pm.GPUS[arch]),
                        "summary": stats, "targets": am.targets(stats), "rows": model_rows})
    blocks = am.batch_norm_blocks(args.model, args.batch, dtype)
    console.print(am.batch_norm_blocks_line(blocks), markup=False)
    for r in bad:
        for problem in r.problems:
            console.print(f"  {r.kernel} [{r.config}] {r.dtype} sm_{r.arch}: {problem}", markup=False)
    if args.json:
        from cnnperf._env import versions

        write_json_atomic(args.json, {"versions": versions(), "model": args.model, "batch": args.batch,
                                      "dtype": dtype, "seconds": round(time.perf_counter() - start, 1),
                                      "archs": records, "batch_norm_blocks": blocks})
    return 1 if bad else 0


if __name__ == "__main__":
    from cnnperf.audit import main as _main  # one identity for KernelAudit, Job, Row: cnnperf.audit's

    sys.exit(_main())
