"""``cnnperf audit --model resnet50|vgg16``: the static performance model of the conv kernels, per layer and pass.

For every distinct convolution of the model (:mod:`cnnperf.conv_shapes`) and every pass the fused layer runs
(``fwd``; backward: ``mask``, ``dgrad``, ``wgrad``), it takes the config the launcher would pick
(:func:`cnnperf.perf_model.choose_config`), compiles the kernel with the specialization Triton would launch
(int arguments equal to 1 become constexprs, those divisible by 16 carry the divisibility hint), reads the
registers, shared memory and K-loop instructions from the SASS, and applies :mod:`cnnperf.perf_model` (the
model and its assumptions are documented there). Rows, FLOP-weighted geomeans and the issue's targets are
printed and written as JSON.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

from cnnperf import perf_model as pm
from cnnperf._format import sig

KERNEL_OF = {"fwd": "_conv_bias_relu_fwd_kernel", "dgrad": "_conv_dgrad_kernel", "wgrad": "_conv_wgrad_kernel"}
GEMM_PASSES = ("fwd", "dgrad", "wgrad")
BACKWARD = ("mask", "dgrad", "wgrad")
ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}


def config_list(kind: str, dtype: str):
    """The config list the launcher picks from for ``kind`` and ``dtype`` (a torch dtype name)."""
    import torch

    from cnnperf.ops.conv_bias_relu import config_list as launcher_list

    return launcher_list(kind, getattr(torch, dtype))


def launch_ints(kind: str, conv: pm.Conv, split: int = 1) -> dict[str, int]:
    """The int arguments of kernel ``kind`` by name, as ``cnnperf/ops/conv_bias_relu.py`` launches it on an
    NHWC input (tests check this against a real launch); ``split``: wgrad's SPLIT (fwd's and dgrad's SPLIT_K
    is a constexpr)."""
    shapes = dict(N=conv.n, H=conv.h, W=conv.w, C_in=conv.c_in, OH=conv.oh, OW=conv.ow, C_out=conv.c_out)
    geometry = dict(stride_h=conv.stride[0], stride_w=conv.stride[1], pad_h=conv.padding[0], pad_w=conv.padding[1],
                    dil_h=conv.dilation[0], dil_w=conv.dilation[1], C_in_g=conv.c_in_g, C_out_g=conv.c_out_g)
    strides = dict(sxn=conv.h * conv.w * conv.c_in, sxh=conv.w * conv.c_in, sxw=conv.c_in)
    if kind == "fwd":
        return {**shapes, **strides, **geometry}
    if kind == "dgrad":
        steps = dict(step_h=conv.stride[0] // math.gcd(conv.stride[0], conv.dilation[0]),
                     step_w=conv.stride[1] // math.gcd(conv.stride[1], conv.dilation[1]))
        return {**shapes, **geometry, **steps}
    return {**shapes, **strides, **geometry, "SPLIT": split}


def specialization(ints: Mapping[str, int]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(ints compiled as the constexpr 1, ints with the divisibility-16 hint): Triton's launch-time rule
    (``native_specialize_impl``: 1 -> constexpr, a multiple of 16, 0 included -> divisibility 16)."""
    ones = tuple(k for k, v in ints.items() if v == 1)
    div16 = tuple(k for k, v in ints.items() if v != 1 and v % 16 == 0)
    return ones, div16


@dataclasses.dataclass
class LayerPass:
    layer: str
    layers: int  # layers of the model with this shape
    kind: str
    conv: pm.Conv
    config: dict | None
    job: Any = None  # the audit Job compiling it (GEMM passes)
    mask_y: bool = False  # dgrad / wgrad applying the ReLU mask (perf_model.choose_backward)


def plan_model(model: str, batch: int, dtype: str, arch: int, image_size: int = 224,
               first_layer_dgrad: bool = False) -> list[LayerPass]:
    """Every (layer, pass) of ``model`` with its config and its compile job (deduplicated by the caller).
    The first layer's dgrad is left out (its input is the images) unless ``first_layer_dgrad``: the
    benchmark times every layer's backward into its input."""
    from cnnperf.conv_shapes import model_conv_layers, unique_shapes

    gpu = pm.GPUS[arch]
    out = []
    layers = model_conv_layers(model, batch, image_size)
    for shape in unique_shapes(layers):
        conv = pm.Conv.of(shape, ITEMSIZE[dtype], has_bias=True)
        # The launcher's choice (channels_last grads): the mask in the backward GEMMs, or a mask pass first.
        mask_y, backward = pm.choose_backward(conv, config_list("dgrad", dtype), config_list("wgrad", dtype), gpu)
        if not mask_y:
            out.append(LayerPass(shape.name, shape.layers, "mask", conv, None))
        for kind in GEMM_PASSES:
            if kind == "dgrad" and shape.name == layers[0].name and not first_layer_dgrad:
                continue  # the first layer reads the images: no input gradient is asked for, none is computed
            cfg = backward[kind] if kind in backward else pm.choose_config(kind, conv, config_list(kind, dtype), gpu)
            masked = mask_y and kind != "fwd"
            out.append(LayerPass(shape.name, shape.layers, kind, conv, cfg,
                                 make_job(kind, conv, cfg, dtype, arch, masked), masked))
    return out


def make_job(kind: str, conv: pm.Conv, cfg: Mapping[str, int], dtype: str, arch: int, mask_y: bool = False):
    """The audit Job compiling kernel ``kind`` as the launcher runs it on ``conv`` with ``cfg``: its
    constexprs (filter size, bias, SPLIT_K, FOLD_C, EVEN_K/EVEN_N, MASK_Y/BIAS_GRAD) and Triton's launch
    specialization."""
    from cnnperf import audit

    gpu = pm.GPUS[arch]
    split = pm.wgrad_split(conv, cfg, gpu, mask_y) if kind == "wgrad" else cfg.get("SPLIT_K", 1)
    ones, div16 = specialization(launch_ints(kind, conv, split))
    entry = next(k for k in audit.KERNELS if k.kernel == KERNEL_OF[kind])
    params = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages", "SPLIT_K")}
    options = {k: cfg[k] for k in ("num_warps", "num_stages") if k in cfg}
    constexprs = {**entry.constexprs, **entry.dtype_constexprs.get(dtype, {}), **entry.arch_constexprs.get(arch, {}),
                  **params, "KH": conv.kh, "KW": conv.kw}
    if "HAS_BIAS" in constexprs:
        constexprs["HAS_BIAS"] = conv.has_bias
    if "MASK_Y" in constexprs:
        constexprs["MASK_Y"] = mask_y
    if "BIAS_GRAD" in constexprs:
        constexprs["BIAS_GRAD"] = mask_y and conv.has_bias
    if "SPLIT_K" in constexprs:
        constexprs["SPLIT_K"] = cfg.get("SPLIT_K", 1)
    if "FOLD_C" in constexprs:
        constexprs["FOLD_C"] = pm.fold_channels(conv.c_in_g)
    # The K loop's channels: C_in/g (fwd), C_out/g (dgrad); N the others.
    k_ch, n_ch = (conv.c_in_g, conv.c_out_g) if kind == "fwd" else (conv.c_out_g, conv.c_in_g)
    if "EVEN_K" in constexprs:
        constexprs["EVEN_K"] = k_ch % cfg["BLOCK_K"] == 0
    if "EVEN_N" in constexprs:
        constexprs["EVEN_N"] = n_ch % cfg["BLOCK_N"] == 0
    label = audit.config_label(params, options) + (f" k{split}" if kind != "wgrad" and split > 1 else "")
    return audit.Job(entry.module, entry.kernel, dtype, arch, label, constexprs, options, dict(entry.arg_types),
                     div16, entry.tensor_cores, None, ones)


# The K-loop measure: the forward's 128x128x64 config on a 3x3 stride-1 layer whose channels fill the
# tile (C_in/g >= 64, C_out/g >= 128: a K loop of 9+ iterations, no partial tiles), the config and filter its
# 211 instructions per 4 HGMMA were counted on. The picked configs' own loops are in the rows.
PROBE_CONFIG = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}


def probe_pass(model: str, batch: int, dtype: str, arch: int, image_size: int = 224) -> LayerPass | None:
    """The forward of the model's first layer that fits :data:`PROBE_CONFIG`'s measure (16-bit dtypes)."""
    from cnnperf.conv_shapes import model_conv_layers

    if ITEMSIZE[dtype] != 2:
        return None
    for shape in model_conv_layers(model, batch, image_size):
        if ((shape.kh, shape.kw) == (3, 3) and tuple(shape.stride) == (1, 1) and shape.c_in // shape.groups >= 64
                and shape.c_out // shape.groups >= 128):
            conv = pm.Conv.of(shape, 2, has_bias=True)
            return LayerPass(shape.name, 1, "fwd", conv, dict(PROBE_CONFIG),
                             make_job("fwd", conv, PROBE_CONFIG, dtype, arch))
    return None


def _job_key(job) -> tuple:
    return (job.kernel, job.dtype, job.arch, job.config, tuple(sorted(job.constexprs.items())),
            tuple(sorted(job.options.items())), job.divisible_by_16, job.ones)


def unique_jobs(passes: Sequence[LayerPass]) -> list:
    seen: dict[tuple, Any] = {}
    for p in passes:
        if p.job is not None:
            seen.setdefault(_job_key(p.job), p.job)
    return list(seen.values())


def model_rows(passes: Sequence[LayerPass], compiled: Mapping[tuple, Any], arch: int) -> list[dict]:
    """The model's rows: one per (layer, pass), with the compiled kernel's figures where there is one."""
    gpu = pm.GPUS[arch]
    rows = []
    for p in passes:
        base = {"layer": p.layer, "layers": p.layers, "arch": arch, "shape": _shape_fields(p.conv)}
        if p.kind == "mask":
            rows.append({**base, **pm.pass_row("mask", p.conv, gpu, pm.mask_pass(p.conv, gpu))})
            continue
        row = compiled[_job_key(p.job)]
        mma = next(iter(row.mma), None)
        figures = {}
        if row.error is None:
            figures = dict(registers=row.registers, shared_bytes=row.shared_bytes,
                           mainloop_instructions=row.mainloop_instructions, mma=mma)
        kernels = pm.gemm_pass(p.kind, p.conv, p.config, gpu, mask_y=p.mask_y, **figures)
        out = {**base, **pm.pass_row(p.kind, p.conv, gpu, kernels), "mask_y": p.mask_y, "compiled": row.ok,
               "problems": list(row.problems), "registers": row.registers, "shared_bytes": row.shared_bytes,
               "mma": row.mma, "mainloop_instructions": row.mainloop_instructions,
               "mainloop_mma": row.mainloop_mma,
               "mainloop_instructions_per_mma": (round(row.mainloop_instructions / row.mainloop_mma, 2)
                                                 if row.mainloop_mma else None),
               "specialization": {"ones": list(p.job.ones), "divisible_by_16": list(p.job.divisible_by_16)}}
        rows.append(out)
    return rows


def _shape_fields(conv: pm.Conv) -> dict:
    fields = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(conv).items()}
    return {**fields, "out_h": conv.oh, "out_w": conv.ow}


def summarize(rows: Sequence[dict], probe: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """FLOP-weighted geomeans of the predicted fraction of peak per pass, for the forward, the backward and
    both (a layer's backward or forward+backward fraction is its FLOPs over its passes' summed time), and the
    figures of the issue's targets (``probe``: the :func:`probe_pass` row, for the K-loop measure)."""
    by_layer: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_layer.setdefault(r["layer"], {})[r["pass"]] = r
    out: dict[str, Any] = {}
    for kind in GEMM_PASSES:
        out[f"geomean_{kind}"] = pm.weighted_geomean(
            (r["predicted_fraction_of_peak"], r["flops"] * r["layers"]) for r in rows if r["pass"] == kind)

    def combined(kinds):
        pairs = []
        for passes in by_layer.values():
            fwd = passes["fwd"]
            peak = pm.GPUS[fwd["arch"]].peak_flops(pm.operands(fwd["shape"]["itemsize"], None, fwd["arch"]))
            run = [passes[k] for k in kinds if k in passes]  # the first layer has no dgrad
            flops = sum(r["flops"] for r in run)
            pairs.append((flops / (peak * sum(r["seconds"] for r in run)), flops * fwd["layers"]))
        return pm.weighted_geomean(pairs)

    out["geomean_backward"] = combined(BACKWARD)
    out["geomean_fwd_bwd"] = combined(("fwd",) + BACKWARD)
    wgrad = [r for r in rows if r["pass"] == "wgrad"]
    strided = [r for r in rows if r["pass"] == "dgrad" and max(r["shape"]["stride"]) > 1]
    stems = [r for r in rows if r["pass"] == "fwd" and r["shape"]["c_in"] <= 4]
    out["min_wgrad_waves"] = min((r["waves"] for r in wgrad), default=None)
    out["min_strided_dgrad_useful_mma"] = min((r["useful_mma_fraction"] for r in strided), default=None)
    out["min_stem_fwd_useful_mma"] = min((r["useful_mma_fraction"] for r in stems), default=None)
    if probe is not None and probe.get("mainloop_mma"):
        out["fwd_128x128x64_instructions_per_4_mma"] = 4 * probe["mainloop_instructions"] / probe["mainloop_mma"]
        out["fwd_probe_layer"] = probe["layer"]
    ratios = []
    for passes in by_layer.values():
        run = [passes[k] for k in BACKWARD if k in passes]
        ratios.append(sum(r["hbm_bytes"] for r in run) / sum(r["min_hbm_bytes"] for r in run))
    out["max_backward_hbm_over_min"] = max(ratios, default=None)
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}


def batch_norm_blocks(model: str, batch: int, dtype: str, image_size: int = 224) -> dict[str, Any]:
    """The Conv -> BatchNorm2d -> (+ residual ->) ReLU blocks that :func:`cnnperf.fuse` turns into fused layers
    in ``model`` (training mode), and their HBM bytes per training step fused and unfused
    (:func:`cnnperf.perf_model.batch_norm_block_kernels`), per block and in total; a fused block's dgrad and
    wgrad compute dz as they load where the model picks that on sm_90 (``dz_in_gemms``)."""
    from cnnperf.conv_shapes import meta_model, model_conv_layers
    from cnnperf.fusion import REPORT_ATTRIBUTE, fuse
    from cnnperf.nn import FusedConv2dBatchNormReLU

    fused = fuse(meta_model(model).train(), inplace=True)
    report = getattr(fused, REPORT_ATTRIBUTE)
    blocks = {name for name, m in fused.named_modules() if isinstance(m, FusedConv2dBatchNormReLU)}
    layers = model_conv_layers(model, batch, image_size)
    rows, totals = [], {"fused": 0, "unfused": 0}
    for layer in layers:
        name = layer.name.split(".", 1)[1]
        if name not in blocks:
            continue
        conv = dataclasses.replace(pm.Conv.of(layer), itemsize=ITEMSIZE[dtype], has_bias=False)
        dz_in_gemms = pm.choose_batch_norm_backward(conv, config_list("dgrad", dtype), config_list("wgrad", dtype),
                                                    pm.GPUS[90])[0]
        row = {"layer": name, "residual": name in report.residual, "dz_in_gemms": dz_in_gemms}
        for kind in totals:
            kernels = pm.batch_norm_block_kernels(conv, fused=kind == "fused", residual=row["residual"],
                                                  dz_in_gemms=dz_in_gemms and kind == "fused")
            row[kind] = sum(bytes_ for _, _, bytes_ in kernels)
            totals[kind] += row[kind]
        rows.append(row)
    return {"model": model, "batch": batch, "dtype": dtype, "blocks": len(rows),
            "residual_blocks": sum(r["residual"] for r in rows), "convs": len(layers),
            "dz_in_gemms_blocks": sum(r["dz_in_gemms"] for r in rows),
            "fused_bytes": totals["fused"], "unfused_bytes": totals["unfused"],
            "fused_over_unfused": round(totals["fused"] / totals["unfused"], 4) if rows else None, "rows": rows}


def batch_norm_blocks_line(blocks: Mapping[str, Any]) -> str:
    """One sentence on :func:`batch_norm_blocks`."""
    if not blocks["blocks"]:
        return f"{blocks['model']}: no Conv -> BatchNorm2d -> ReLU block to fuse in training"
    ratio = blocks["fused_over_unfused"]
    return (f"{blocks['model']} Conv -> BatchNorm2d -> ReLU blocks ({blocks['blocks']} of {blocks['convs']} convs, "
            f"{blocks['residual_blocks']} with a residual add, {blocks['dz_in_gemms_blocks']} with dz computed in the "
            f"GEMMs; batch {blocks['batch']} {blocks['dtype']}, training "
            f"step): HBM {blocks['fused_bytes'] / 1e9:.2f} GB "
            f"fused vs {blocks['unfused_bytes'] / 1e9:.2f} GB eager, {ratio:.2f}x ({100 * (1 - ratio):.1f} % fewer)")


# The targets of issue 12, checked on the model's figures: (summary key, comparison, goal, what it says).
TARGETS = (
    ("min_wgrad_waves", ">=", 2.0, "wgrad: >= 2 waves on every layer"),
    ("min_strided_dgrad_useful_mma", ">=", 0.9, "dgrad: useful MMA fraction >= 0.9 on every stride-2 layer"),
    ("min_stem_fwd_useful_mma", ">=", 0.5, "stem forward: useful MMA fraction >= 0.5"),
    ("fwd_128x128x64_instructions_per_4_mma", "<=", 110, "forward K loop: <= 110 instructions per 4 MMA"),
    ("max_backward_hbm_over_min", "<=", 1.15, "backward HBM bytes <= 1.15x the minimum on every layer"),
    ("geomean_fwd", ">=", 0.55, "forward: predicted geomean fraction of peak >= 0.55 (at batch 128)"),
    ("geomean_fwd_bwd", ">=", 0.45, "forward+backward: predicted geomean fraction of peak >= 0.45"),
)


def targets(summary: Mapping[str, Any]) -> list[dict]:
    out = []
    for key, op, goal, what in TARGETS:
        value = summary.get(key)
        met = None if value is None else (value >= goal if op == ">=" else value <= goal)
        out.append({"target": what, "key": key, "goal": f"{op} {goal}", "value": value, "met": met})
    return out


def render(rows: Sequence[dict], summary: Mapping[str, Any], console, title: str) -> None:
    from rich.table import Table

    from cnnperf._format import fmt

    table = Table(title=title)
    for name in ("layer", "x", "pass", "config", "ctas", "cta/SM", "waves", "useful MMA", "instr/MMA",
                 "HBM / min", "bound", "pred. % peak"):
        table.add_column(name, justify="left" if name in ("layer", "pass", "config", "bound") else "right",
                         no_wrap=True)
    for r in rows:
        ratio = r["hbm_bytes"] / r["min_hbm_bytes"] if r["min_hbm_bytes"] else None
        table.add_row(r["layer"], str(r["layers"]), r["pass"], r.get("config", "-"), fmt(r.get("ctas"), "d"),
                      fmt(r.get("ctas_per_sm"), "d"), fmt(r.get("waves"), ".2f"),
                      fmt(r.get("useful_mma_fraction"), ".2f"), fmt(r.get("mainloop_instructions_per_mma"), ".1f"),
                      fmt(ratio, ".2f") if ratio is not None else "extra pass", r.get("bound", "memory"),
                      fmt(100 * r["predicted_fraction_of_peak"], ".1f") if r["predicted_fraction_of_peak"] else "-",
                      style=None if r.get("compiled", True) else "bold red")
    console.print(table)
    line = ", ".join(f"{k[len('geomean_'):]} {100 * v:.1f} %" for k, v in summary.items()
                     if k.startswith("geomean_") and v is not None)
    console.print(f"predicted fraction of peak, FLOP-weighted geomean: {line}", markup=False)
    for t in targets(summary):
        mark = {True: "met", False: "NOT met", None: "n/a"}[t["met"]]
        console.print(f"  target {t['target']}: {t['value']} ({mark})", markup=False)


# ---------------------------------------------------------------------------------------------------------
# The model against a benchmark record (`cnnperf audit --compare bench_conv.json`): its error per layer.
# ---------------------------------------------------------------------------------------------------------

BENCH_PASSES = {"fwd": ("fwd",), "fwdbwd": ("fwd",) + BACKWARD}  # a benchmark pass -> the model's passes


def arch_of(device: str) -> int | None:
    """The model's GPU for a benchmark record's device name: 90 for H100/H200/GH200, 80 for A100."""
    name = device.upper()
    if any(k in name for k in ("H100", "H200", "GH200", "H800")):
        return 90
    if "A100" in name or "A800" in name:
        return 80
    return None


def compare_plan(record: Mapping[str, Any], arch: int) -> list[LayerPass]:
    """The (layer, pass) plan of every model in a ``cnnperf bench`` record, at its batch, image size and dtype."""
    cfg = record["config"]
    out = []
    for model in cfg["models"]:
        out += plan_model(model, cfg["batch"], cfg["dtype"], arch, cfg["image_size"], first_layer_dgrad=True)
    return out


def compare_rows(record: Mapping[str, Any], model_rows_: Sequence[dict]) -> list[dict]:
    """One row per timed Triton row of the record: measured and predicted milliseconds, and the error
    (predicted / measured - 1). Rows the Triton kernels did not run (another path, an error) are left out."""
    by_layer: dict[str, dict[str, dict]] = {}
    for r in model_rows_:
        by_layer.setdefault(r["layer"], {})[r["pass"]] = r
    out = []
    for row in record["rows"]:
        if row.get("variant") != "cnnperf" or row.get("path") != "triton" or "median_ms" not in row:
            continue
        passes = by_layer.get(row["name"])
        if passes is None or row["pass"] not in BENCH_PASSES:
            continue
        predicted = 1e3 * sum(passes[k]["seconds"] for k in BENCH_PASSES[row["pass"]] if k in passes)
        configs = {k: passes[k]["config"] for k in GEMM_PASSES if k in passes}
        ran = row.get("configs")  # what the kernels launched with, when the record says (newer records)
        out.append({"layer": row["name"], "pass": row["pass"], "measured_ms": row["median_ms"],
                    "predicted_ms": sig(predicted, 6), "error": round(predicted / row["median_ms"] - 1, 4),
                    "bound": passes["fwd"].get("bound"), "configs": configs,
                    "configs_ran": ran, "same_configs": None if ran is None else ran == configs})
    return out


def compare_summary(rows: Sequence[dict]) -> dict[str, Any]:
    """Per benchmark pass: rows, the median absolute error, and the geomean of predicted / measured."""
    out: dict[str, Any] = {}
    for p in BENCH_PASSES:
        errors = [r["error"] for r in rows if r["pass"] == p]
        if errors:
            out[p] = {"rows": len(errors), "median_abs_error": round(sorted(map(abs, errors))[len(errors) // 2], 4),
                      "geomean_predicted_over_measured": round(pm.weighted_geomean((1 + e, 1) for e in errors), 4)}
    return out


def render_compare(rows: Sequence[dict], summary: Mapping[str, Any], console, title: str) -> None:
    from rich.table import Table

    table = Table(title=title)
    for name in ("layer", "pass", "measured ms", "predicted ms", "error", "fwd bound"):
        table.add_column(name, justify="left" if name in ("layer", "pass", "fwd bound") else "right", no_wrap=True)
    for r in rows:
        table.add_row(r["layer"], r["pass"], f"{r['measured_ms']:.4g}", f"{r['predicted_ms']:.4g}",
                      f"{100 * r['error']:+.0f} %", r["bound"] or "-",
                      style="yellow" if r["same_configs"] is False else None)
    console.print(table)
    if any(r["same_configs"] is False for r in rows):
        console.print("yellow rows: the record's kernels ran other configs than the model predicts for (an older "
                      "commit, or CNNPERF_AUTOTUNE=1)", markup=False)
    for p, s in summary.items():
        console.print(f"{p}: {s['rows']} layers, median |error| {100 * s['median_abs_error']:.0f} %, predicted / "
                      f"measured geomean {s['geomean_predicted_over_measured']:.3f}", markup=False)
