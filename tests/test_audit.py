"""`cnnperf audit`: ahead-of-time compiles for sm_80 / sm_90 on a machine without a GPU.

The compiling tests audit a few small cases only (CI runs the full ``cnnperf audit`` separately): one audit of
three rows of the forward kernel on sm_80 (the smallest real fp16 config, one config that must spill, one that
must overflow shared memory), one clean audit through the ``cnnperf`` command, and ``--help``. The registry
checks and the parsers need no compile.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import json
import math
import os
import pkgutil
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

from triton.runtime.jit import JITFunction  # noqa: E402

from cnnperf import audit, cli  # noqa: E402
from cnnperf._cli import UsageError  # noqa: E402

FWD = "_conv_bias_relu_fwd_kernel"


def _entry(kernel: str) -> audit.KernelAudit:
    return next(k for k in audit.KERNELS if k.kernel == kernel)


def _label(config) -> str:
    (params, options), = audit._normalize_configs(config)
    return audit.config_label(params, options)


def _tile(config) -> int:
    return math.prod(v for k, v in config.kwargs.items() if k.startswith("BLOCK_"))


# 128x128 fp32 accumulator over 2 warps: 256 registers a thread for the accumulator alone (the cap is 255).
SPILL = triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 16, "GROUP_M": 8}, num_warps=2, num_stages=2)
# 64x128 + 128x64 fp16 tiles = 32 KB a stage, 7 stages in flight = 224 KB > sm_80's 163 KB.
SMEM = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=4, num_stages=8)


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """One ``cnnperf audit`` run over three forward-kernel rows on sm_80: (exit status, JSON, output, labels)."""
    kernels = importlib.import_module(_entry(FWD).module)
    real = min(kernels.FWD_CONFIGS_16, key=_tile)
    entry = dataclasses.replace(_entry(FWD), configs={"float16": [real, SPILL, SMEM]})
    tmp = tmp_path_factory.mktemp("audit")
    interpret_before = os.environ.get("TRITON_INTERPRET")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = audit.main(["--arch", "80", "--jobs", "2", "--json", str(tmp / "audit.json"),
                             "--sass-dir", str(tmp / "sass")], kernels=[entry])
    assert os.environ.get("TRITON_INTERPRET") == interpret_before  # the workers' flag stays theirs
    report = json.loads((tmp / "audit.json").read_text())
    rows = {row["config"]: row for row in report["rows"]}
    labels = {"real": _label(real), "spill": _label(SPILL), "smem": _label(SMEM)}
    return status, report, rows, labels, out.getvalue(), tmp


@pytest.mark.slow
def test_real_config_compiles_clean_with_tensor_cores(audited):
    _, _, rows, labels, _, _ = audited
    row = rows[labels["real"]]
    assert row["error"] is None, row["error"]
    assert row["arch"] == 80 and row["dtype"] == "float16"
    assert row["registers"] > 0
    assert row["stack_bytes"] == 0 and row["local_bytes"] == 0
    assert 0 < row["shared_bytes"] <= row["shared_limit"] == 163 * 1024
    assert row["mma"].get("HMMA", 0) > 0, row["mma"]  # a 16-bit tl.dot on sm_80: mma.sync
    assert row["ok"] and row["problems"] == []


@pytest.mark.slow
def test_spill_and_shared_memory_overflow_are_flagged(audited):
    status, report, rows, labels, output, _ = audited
    spill, smem = rows[labels["spill"]], rows[labels["smem"]]
    assert spill["stack_bytes"] + spill["local_bytes"] > 0
    assert not spill["ok"] and any(p.startswith("spill") for p in spill["problems"])
    assert smem["shared_bytes"] > smem["shared_limit"]
    assert not smem["ok"] and any(p.startswith("shared memory") for p in smem["problems"])
    assert status == 1
    assert report["summary"]["spills"] >= 1 and report["summary"]["smem_over_limit"] == 1
    offending = output[output.index("offending rows"):]
    assert labels["spill"] in offending and labels["smem"] in offending
    assert labels["real"] not in offending


@pytest.mark.slow
def test_json_has_the_table_fields_and_is_written_atomically(audited):
    _, report, rows, _, output, tmp = audited
    assert set(report) == {"versions", "summary", "rows"}
    assert report["versions"]["triton"] == triton.__version__
    assert report["summary"]["rows"] == len(report["rows"]) == 3
    assert {"compiled", "failures", "spills", "smem_over_limit", "no_tensor_cores", "max_registers",
            "seconds", "jobs"} <= set(report["summary"])
    fields = {"kernel", "config", "dtype", "arch", "num_warps", "num_stages", "registers", "stack_bytes",
              "local_bytes", "shared_bytes", "shared_limit", "mma", "mainloop_instructions", "mainloop_mma",
              "compile_s", "error", "problems", "ok"}
    for row in report["rows"]:
        assert set(row) == fields
    assert [p.name for p in tmp.iterdir() if p.name.startswith(".audit-")] == []  # no temporary file left
    assert "audit: 3/3 kernel x config x dtype x arch compiled" in output


@pytest.mark.slow
def test_sass_dir_keeps_cubin_and_sass(audited):
    _, _, _, labels, _, tmp = audited
    stem = f"{FWD}.float16.sm80.{audit._slug(labels['real'])}"
    assert (tmp / "sass" / f"{stem}.cubin").stat().st_size > 0
    assert "HMMA" in (tmp / "sass" / f"{stem}.sass").read_text()


@pytest.mark.slow
def test_clean_audit_as_a_module_exits_zero(tmp_path):
    # As `python -m cnnperf.audit`: the module is __main__ there, which once broke sending jobs to workers.
    done = subprocess.run([sys.executable, "-m", "cnnperf.audit", "--kernel", "relu_mask", "--dtype", "fp32",
                           "--arch", "90", "--jobs", "1", "--json", str(tmp_path / "a.json")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (row,) = json.loads((tmp_path / "a.json").read_text())["rows"]
    assert row["kernel"] == "_relu_mask_bias_grad_kernel" and row["arch"] == 90 and row["ok"]
    assert row["registers"] > 0 and row["mma"] == {}  # no tl.dot, and none expected
    assert "audit: 1/1" in done.stdout


@pytest.mark.slow
def test_module_help():
    done = subprocess.run([sys.executable, "-m", "cnnperf.audit", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    for option in ("--arch", "--kernel", "--dtype", "--jobs", "--json", "--sass-dir"):
        assert option in done.stdout


def test_no_matching_kernel_is_a_usage_error(capsys):
    assert cli.main(["audit", "--kernel", "no_such_kernel"]) == 2  # through the `cnnperf` command
    assert "no_such_kernel" in capsys.readouterr().out


def test_dtype_aliases():
    assert audit._parse_args(["--dtype", "bf16"]).dtype == "bfloat16"
    with pytest.raises(UsageError, match="--dtype.*int8"):
        audit._parse_args(["--dtype", "int8"])


# ---------------------------------------------------------------------------------------------------------
# The registry, without compiling.
# ---------------------------------------------------------------------------------------------------------

def _kernel_functions():
    """(module, name) of every ``*_kernel`` @triton.jit function in cnnperf.kernels (jitted or interpreted)."""
    import cnnperf.kernels as package

    found = []
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, value in vars(module).items():
            if name.endswith("_kernel") and hasattr(value, "fn") and hasattr(value, "arg_names"):
                found.append((module.__name__, name))
    return found


def test_every_kernel_has_an_audit_entry():
    kernels = _kernel_functions()
    assert (_entry(FWD).module, FWD) in kernels
    audited = {(k.module, k.kernel) for k in audit.KERNELS}
    assert set(kernels) <= audited, f"kernels without an audit entry: {sorted(set(kernels) - audited)}"


def test_full_plan_covers_every_config_and_builds_a_signature():
    jobs = audit.plan()
    conv = importlib.import_module(_entry(FWD).module)
    fwd = [j for j in jobs if j.kernel == FWD and not j.config.endswith(("STATS", "residual"))]
    assert len(fwd) == (2 * len(conv.FWD_CONFIGS_16) + len(conv.FWD_CONFIGS_32)) * len(audit.ARCHS)
    expected = {}
    for entry in audit.KERNELS:  # a kernel may have several entries (variants)
        n = sum(len(audit._normalize_configs(audit.resolve_configs(entry.module, c))) for c in entry.configs.values())
        assert n > 0, entry.kernel
        archs = sum(arch >= entry.min_arch for arch in audit.ARCHS)  # the BatchNorm dz GEMMs: sm_90 only
        expected[entry.kernel] = expected.get(entry.kernel, 0) + n * archs
    for kernel, n in expected.items():
        assert sum(j.kernel == kernel for j in jobs) == n, kernel
    assert {j.arch for j in jobs} == {80, 90} and set(audit.DTYPES) <= {j.dtype for j in jobs}
    residual = [j for j in jobs if j.kernel == FWD and j.config.endswith(" residual")]
    assert len(residual) == (2 * len(conv.FWD_RESIDUAL_CONFIGS_16) + len(conv.FWD_RESIDUAL_CONFIGS_32)) * 2
    assert all(j.constexprs["HAS_RESIDUAL"] and not j.constexprs["STATS"] for j in residual)
    bn_dz = [j for j in jobs if j.config.endswith(" BN")]
    assert bn_dz and {j.arch for j in bn_dz} == {90} and all(j.constexprs["BN_GRAD"] for j in bn_dz)
    signatures = {}
    for job in jobs:
        kernel = getattr(importlib.import_module(job.module), job.kernel)
        fn = JITFunction(getattr(kernel, "fn", kernel))  # the worker's view of the kernel (params, constexprs)
        signature, _, attrs = audit._specialization(fn, job)  # raises on a constexpr without a value, a typo
        signatures[job.kernel, job.dtype] = signature
        if "INPUT_PRECISION" in signature:  # TF32 for fp32 operands, as on a GPU
            assert job.constexprs["INPUT_PRECISION"] == ("tf32" if job.dtype == "float32" else "ieee")
        pointers = [i for i, name in enumerate(signature) if signature[name].startswith("*")]
        assert all(attrs[(i,)] == [["tt.divisibility", 16]] for i in pointers)
    assert signatures[FWD, "bfloat16"]["x_ptr"] == "*bf16"
    assert signatures[FWD, "bfloat16"]["N"] == "i32"
    assert signatures[FWD, "bfloat16"]["KH"] == "constexpr"
    assert signatures["_conv_wgrad_kernel", "float16"]["dw_ptr"] == "*fp32"
    assert signatures["_relu_mask_bias_grad_kernel", "bfloat16"]["partial_ptr"] == "*fp32"
    assert signatures["_relu_mask_bias_grad_kernel", "bfloat16"]["g_ptr"] == "*bf16"


def test_a_pointer_without_a_type_is_an_error():
    entry = dataclasses.replace(_entry("_grad_scale_kernel"), arg_types={})
    (job, *_) = audit.plan([entry])
    fn = JITFunction(getattr(importlib.import_module(job.module), job.kernel).fn)
    with pytest.raises(ValueError, match="addr_ptr needs a type"):
        audit._specialization(fn, job)


def test_plan_filters():
    jobs = audit.plan(archs=(90,), dtypes=("float32",), kernel_filter="dgrad")
    assert jobs and all(j.kernel == "_conv_dgrad_kernel" and j.arch == 90 and j.dtype == "float32" for j in jobs)
    assert {j.dtype for j in audit.plan(dtypes=("bfloat16",))} == {"bfloat16", audit.ANY_DTYPE}
    generic = audit.plan(kernel_filter="fwd", generic_ints=True)
    assert generic and all(j.divisible_by_16 == () for j in generic)


# ---------------------------------------------------------------------------------------------------------
# Parsing cuobjdump output and judging rows.
# ---------------------------------------------------------------------------------------------------------

RES_USAGE = """
Resource usage:
 Common:
  GLOBAL:0
 Function _conv_bias_relu_fwd_kernel:
  REG:168 STACK:16 SHARED:1024 LOCAL:8 CONSTANT[0]:472 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

SASS = """
        /*0a30*/                   HMMA.16816.F32.BF16 R24, R4, R20, R24 ;
        /*0a40*/              @!P0 HGMMA.64x128x16.F32.BF16 gdesc[UR4], RZ, !UPT ;
        /*0a50*/                   LDSM.16.M88.4 R4, [R2] ;
        /*0a60*/                   FFMA R1, R2, R3, R4 ;
        /*0a70*/                   HMMA.1684.F32.TF32 R8, R4, R20, R8 ;
"""


def test_parse_res_usage():
    assert audit.parse_res_usage(RES_USAGE) == {"registers": 168, "stack_bytes": 16, "static_shared": 1024,
                                                "local_bytes": 8}
    with pytest.raises(ValueError):
        audit.parse_res_usage("no kernel here")


def test_count_mma():
    assert audit.count_mma(SASS) == {"HMMA": 2, "HGMMA": 1}
    assert audit.count_mma("        /*0010*/                   FFMA R1, R2, R3, R4 ;") == {}


def _row(**kw) -> audit.Row:
    base = dict(kernel="k", config="c", dtype="float16", arch=90, registers=100, stack_bytes=0, local_bytes=0,
                shared_bytes=1000, shared_limit=audit.ARCHS[90].smem_limit, mma={"HGMMA": 4})
    return audit.Row(**{**base, **kw})


@pytest.mark.parametrize("kw, tensor_cores, problem", [
    ({}, True, None),
    ({"local_bytes": 4}, True, "spill"),
    ({"stack_bytes": 8}, False, "spill"),
    ({"shared_bytes": 227 * 1024 + 1}, True, "shared memory"),
    ({"shared_bytes": 227 * 1024}, True, None),  # at the limit is within it
    ({"mma": {}}, True, "no tensor-core"),
    ({"mma": {}}, False, None),  # an elementwise kernel needs none
    ({"mma": {"HMMA": 8}}, True, None),  # mma.sync on sm_90 is legitimate: reported, not flagged
    ({"error": "PTXASError: boom", "registers": None}, True, "compile failed"),
])
def test_judge(kw, tensor_cores, problem):
    row = audit.judge(_row(**kw), tensor_cores)
    if problem is None:
        assert row.ok, row.problems
    else:
        assert not row.ok and row.problems[0].startswith(problem), row.problems


@pytest.mark.slow
def test_a_worker_that_dies_fails_its_rows_and_the_audit(tmp_path, monkeypatch):
    (tmp_path / "audit_crash_kernels.py").write_text("import os\nos._exit(7)\n")  # dies on import
    monkeypatch.syspath_prepend(str(tmp_path))  # the workers import what this process imports
    entry = audit.KernelAudit("audit_crash_kernels", "_crash_kernel",
                              {"float16": [{"BLOCK": 16, "num_warps": 1}, {"BLOCK": 32, "num_warps": 1}]})
    rows = audit.run_jobs(audit.plan([entry], archs=(80,)), n_jobs=1)
    assert len(rows) == 2 and not any(r.ok for r in rows)
    assert all("worker died (exit status 7)" in r.error for r in rows)  # each row got a fresh worker
