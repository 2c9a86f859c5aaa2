"""The static performance model (cnnperf/perf_model.py) and `cnnperf audit --model` (cnnperf/audit_model.py).

The arithmetic is checked against brute force (phase taps, issued MACs, wave counts), the launch specialization
against Triton's own rule, the audit's view of the kernels' int arguments against a real launch, and the
SASS loop reader on a listing cut from a real sm_90 kernel. One end-to-end `cnnperf audit --model` compiles a
small model for sm_90 (marked slow).
"""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from cnnperf import audit, audit_model, backend, perf_model as pm
from cnnperf.conv_shapes import conv_shapes
from cnnperf.ops import conv_bias_relu as op

triton = pytest.importorskip("triton")


def _conv(**kw):
    base = dict(n=2, c_in=64, h=28, w=28, c_out=128, kh=3, kw=3, stride=(1, 1), padding=(1, 1))
    return pm.Conv(**{**base, **kw})


@pytest.mark.parametrize("k, stride, pad, dil",
                         list(itertools.product((1, 2, 3, 5, 7), (1, 2, 3), (0, 1, 2, 3), (1, 2))))
def test_phase_taps_are_exactly_the_taps_that_reach_the_phase(k, stride, pad, dil):
    for phase in range(stride):
        first, count = pm.phase_taps(k, stride, pad, dil, phase)
        step = stride // math.gcd(stride, dil)
        expected = [t for t in range(k) if (phase + pad - t * dil) % stride == 0]
        assert [first + j * step for j in range(count)] == expected


def test_phase_rows_partition_the_rows():
    for size, stride in itertools.product(range(1, 12), (1, 2, 3)):
        assert sum(pm.phase_rows(size, stride, p) for p in range(stride)) == size
        for p in range(stride):
            assert pm.phase_rows(size, stride, p) == len(range(p, size, stride))


def test_issued_macs_count_whole_tiles_and_padded_k():
    cfg = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}
    conv = _conv(c_in=16, c_out=64, h=32, w=32)  # 16 channels a tap: one 32-wide K block each, half of it padding
    grid = pm.gemm_grid("fwd", conv, cfg)
    m = conv.n * conv.oh * conv.ow
    assert grid.ctas == math.ceil(m / 64)
    assert grid.issued_macs == grid.ctas * 64 * 64 * 32 * 9
    assert conv.macs / grid.issued_macs == pytest.approx(m / (grid.ctas * 64) * 16 / 32)
    # An RGB stem folds (kw, c) into K: 7 x 3 = 21 of a 32-wide block per filter row, not 3 per tap.
    stem = _conv(c_in=3, c_out=64, kh=7, kw=7, stride=(2, 2), padding=(3, 3), h=32, w=32)
    grid = pm.gemm_grid("fwd", stem, cfg)
    m = stem.n * stem.oh * stem.ow
    assert grid.issued_macs == grid.ctas * 64 * 64 * 32 * 7
    assert stem.macs / grid.issued_macs == pytest.approx(m / (grid.ctas * 64) * 21 / 32)
    wgrad = pm.gemm_grid("wgrad", stem, cfg)
    assert wgrad.ctas == 7  # one 64-wide (kw, c) block per filter row


@pytest.mark.parametrize("h, w, stride, split_k", [(7, 9, (2, 2), 1), (8, 8, (2, 2), 3), (1, 5, (2, 3), 2)])
def test_dgrad_grid_is_what_the_launcher_launches(h, w, stride, split_k):
    """Every phase launches the row tiles of phase (0, 0); those past a smaller phase run no iteration."""
    conv = pm.Conv(2, 48, h, w, 32, 3, 3, stride, (1, 1), groups=2)
    cfg = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": split_k}
    grid = pm.gemm_grid("dgrad", conv, cfg)
    phase0 = conv.n * -(-h // stride[0]) * -(-w // stride[1])
    launched = -(-phase0 // 16) * -(-conv.c_in_g // 16) * conv.groups * stride[0] * stride[1] * split_k
    assert grid.ctas == launched


def test_wgrad_split_slices_cover_the_reduction_once():
    conv = _conv(n=3, h=17, w=19)
    cfg = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}
    for split in (1, 2, 3, 7, 16):
        grid = pm.gemm_grid("wgrad", conv, cfg, split)
        tiles = pm.gemm_grid("wgrad", conv, cfg, 1).ctas
        assert grid.ctas == tiles * split
        rows = sum(i * c for i, c in grid.k_iters) * 32 // tiles
        m = conv.n * conv.oh * conv.ow
        assert m <= rows < m + split * 32  # every row once, each slice padded to a BLOCK_K at most


def test_occupancy_from_registers_and_shared_memory():
    h = pm.H200
    assert pm.ctas_per_sm(h, 8, 130, 97 * 1024) == 1  # 136 regs x 256 threads = 34 K: one by registers
    assert pm.ctas_per_sm(h, 4, 96, 48 * 1024) == 4  # 4 x 49 KB fits in 228 KB; 5 does not
    assert pm.ctas_per_sm(h, 4, 32, 1024) == 16  # threads: 2048 / 128 (registers would allow 16 too)
    assert pm.ctas_per_sm(h, 4, 40, 1024) == 12  # registers: 64 K / (40 x 128)
    assert pm.ctas_per_sm(h, 8, 255, 240 * 1024) == 0  # does not fit at all


@pytest.mark.parametrize("model, batch", [("resnet50", 32), ("resnet50", 128), ("vgg16", 64)])
def test_wgrad_split_is_the_fastest_allowed(model, batch):
    """The split the model picks is within its limits and no allowed split is predicted faster."""
    for shape in conv_shapes(model, batch):
        conv = pm.Conv.of(shape)
        cfg = pm.choose_config("wgrad", conv, audit_model.config_list("wgrad", "bfloat16"), pm.H200)
        split = pm.wgrad_split(conv, cfg, pm.H200)
        m = conv.n * conv.oh * conv.ow
        assert split == 1 or m / split >= pm.WGRAD_MIN_ITERS * cfg["BLOCK_K"] - cfg["BLOCK_K"]

        picked = sum(k.seconds for k in pm.gemm_pass("wgrad", conv, cfg, pm.H200))
        for other in (1, 2, split * 2):
            if other * 4 * conv.c_out * conv.c_in_g * conv.kh * conv.kw > pm.WGRAD_WORKSPACE_CAP:
                continue
            if other > 1 and -(-m // other) < pm.WGRAD_MIN_ITERS * cfg["BLOCK_K"]:
                continue
            grid = pm.gemm_grid("wgrad", conv, cfg, other)
            t = (pm.gemm_cost("wgrad", grid, cfg, 2, pm.H200, pm.gemm_bytes("wgrad", conv, other)).seconds
                 + pm.memory_cost("wgrad_sum", other * 4 * conv.c_out * conv.c_in_g * conv.kh * conv.kw
                                  + conv.sizes()["w"], pm.H200).seconds)
            assert picked <= t * (1 + 1e-9), (shape.name, split, other)


def test_choose_config_is_deterministic_and_from_the_list():
    configs = audit_model.config_list("fwd", "bfloat16")
    labels = {pm.config_dict(c)["BLOCK_M"] * 1000 + pm.config_dict(c)["BLOCK_N"] for c in configs}
    for shape in conv_shapes("resnet50", 32):
        conv = pm.Conv.of(shape)
        first = pm.choose_config("fwd", conv, configs, pm.H200)
        assert first == pm.choose_config("fwd", conv, configs, pm.H200)
        assert first["BLOCK_M"] * 1000 + first["BLOCK_N"] in labels
    with pytest.raises(ValueError, match="no configs"):
        pm.choose_config("fwd", _conv(), [], pm.H200)


def _backward_seconds(conv, mask_y, cfgs, gpu):
    kernels = [k for kind, cfg in cfgs.items() for k in pm.gemm_pass(kind, conv, cfg, gpu, mask_y=mask_y)]
    return sum(k.seconds for k in kernels + ([] if mask_y else pm.mask_pass(conv, gpu)))


def test_choose_backward_masks_in_the_gemms_where_that_is_faster():
    dgrad, wgrad = audit_model.config_list("dgrad", "bfloat16"), audit_model.config_list("wgrad", "bfloat16")
    # ResNet-50's layer1 1x1 expansion at batch 128: memory-bound, the 6 B/element pass a large part of it.
    wide = pm.Conv(128, 64, 56, 56, 256, 1, 1, (1, 1), (0, 0), (1, 1), 1, 2, True)
    # A 3x3 with 512 channels at 14x14: fed from L2, where Y's tile would cost more than the pass saves.
    deep = pm.Conv(128, 512, 14, 14, 512, 3, 3, (1, 1), (1, 1), (1, 1), 1, 2, True)
    for conv, expected in ((wide, True), (deep, False)):
        mask_y, cfgs = pm.choose_backward(conv, dgrad, wgrad, pm.H200)
        assert mask_y is expected
        assert cfgs["dgrad"] == pm.choose_config("dgrad", conv, dgrad, pm.H200, mask_y)
        other = {k: pm.choose_config(k, conv, lst, pm.H200, not mask_y) for k, lst in (("dgrad", dgrad),
                                                                                       ("wgrad", wgrad))}
        assert _backward_seconds(conv, mask_y, cfgs, pm.H200) < _backward_seconds(conv, not mask_y, other, pm.H200)
    # sm_80 has no packed bf16 compare: the mask in the K loop triples it (audit), so never there.
    assert pm.choose_backward(wide, dgrad, wgrad, pm.A100)[0] is False


def test_batch_norm_dz_in_the_gemms_only_where_the_pass_it_saves_outweighs_the_issue_slots():
    """FusedConv2dBatchNormReLU's backward: dgrad and wgrad compute dz as they load grad_out and z (one more tile,
    ~15 instructions an element: audit) only where the dz pass costs more, on ResNet-50 (bf16, batch 32) layer1's
    1x1 convs, whose GEMMs are short beside their conv output (Z); never on a 3x3, whose K loop repeats each
    element over the taps, nor on sm_80. The configs fit the registers with the dz arithmetic."""
    dgrad, wgrad = audit_model.config_list("dgrad", "bfloat16"), audit_model.config_list("wgrad", "bfloat16")
    expand = pm.Conv(32, 64, 56, 56, 256, 1, 1, (1, 1), (0, 0), (1, 1), 1, 2, False)
    three = pm.Conv(32, 64, 56, 56, 64, 3, 3, (1, 1), (1, 1), (1, 1), 1, 2, False)
    for conv, expected in ((expand, True), (three, False)):
        for gpu in (pm.H200, pm.A100):
            bn_dz, cfgs = pm.choose_batch_norm_backward(conv, dgrad, wgrad, gpu)
            assert bn_dz is (expected and gpu.arch >= 90), (conv, gpu.name)
            for kind, cfg in cfgs.items():
                assert cfg == pm.choose_config(kind, conv, dgrad if kind == "dgrad" else wgrad, gpu, bn_dz=bn_dz)
                if bn_dz:
                    assert pm.registers_estimate(cfg, True, gpu.arch, kind, bn_dz=True) <= 255 - pm.SPILL_MARGIN
    cfg = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}
    grid = pm.gemm_grid("dgrad", three, cfg)
    plain = pm.gemm_cost("dgrad", grid, cfg, 2, pm.H200, 0)
    fused = pm.gemm_cost("dgrad", grid, cfg, 2, pm.H200, 0, bn_dz=True)
    assert fused.bound == "issue" and fused.seconds > 1.5 * plain.seconds  # 280 + 15 x 32 per K iteration


def test_masked_gemms_read_y_and_the_wgrad_writes_the_bias_partials():
    conv = _conv()
    s = conv.sizes()
    assert pm.gemm_bytes("dgrad", conv, mask_y=True) - pm.gemm_bytes("dgrad", conv) == s["y"]
    assert pm.gemm_bytes("wgrad", conv, 3, mask_y=True) - pm.gemm_bytes("wgrad", conv, 3) == s["y"] + 3 * 128 * 4
    cfg = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}
    plain = pm.gemm_pass("wgrad", conv, cfg, pm.H200, split=2)
    masked = pm.gemm_pass("wgrad", conv, cfg, pm.H200, split=2, mask_y=True)
    assert [k.name for k in masked] == [k.name for k in plain] + ["bias_sum"]
    assert masked[0].seconds >= plain[0].seconds


def test_a_compute_bound_layer_predicts_a_fraction_of_peak_below_one_and_the_bound():
    conv = _conv(n=128, c_in=256, c_out=256, h=14, w=14)
    cfg = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}
    row = pm.pass_row("fwd", conv, pm.H200, pm.gemm_pass("fwd", conv, cfg, pm.H200, mainloop_instructions=200))
    assert 0 < row["predicted_fraction_of_peak"] < 1
    assert row["bound"] in ("mma", "issue", "feed")
    slower = pm.pass_row("fwd", conv, pm.H200, pm.gemm_pass("fwd", conv, cfg, pm.H200,
                                                             mainloop_instructions=2000))
    assert slower["bound"] == "issue" and slower["seconds"] > row["seconds"]


def test_weighted_geomean():
    assert pm.weighted_geomean([(0.25, 1), (1.0, 1)]) == pytest.approx(0.5)
    assert pm.weighted_geomean([(0.25, 3), (1.0, 0)]) == pytest.approx(0.25)
    assert pm.weighted_geomean([]) is None


def test_specialization_is_tritons_launch_rule():
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    values = {f"v{i}": v for i, v in enumerate((0, 1, 2, 3, 15, 16, 17, 32, 48, 64, 100, 224, 3 * 224 * 224))}
    ones, div16 = audit_model.specialization(values)
    for name, v in values.items():
        kind, attr = native_specialize_impl(BaseBackend, v, False, True, True)[:2]
        assert (name in ones) == (kind == "constexpr"), (v, kind)
        assert (name in div16) == (attr == "D"), (v, attr)


@pytest.mark.parametrize("stride, groups, bias", [(1, 1, True), (2, 1, False), (1, 2, True), (1, 4, True)])
def test_launch_ints_are_what_the_launcher_passes(monkeypatch, stride, groups, bias):
    """The audit compiles the specialization of the ints the launcher really passes: recorded here."""
    import inspect

    kernels = op._kernels()
    launched, consts = {}, {}

    def record(kind, dtype, config, grid, args, const, *where):
        signature = inspect.signature(getattr(kernels, audit_model.KERNEL_OF[kind]).fn).parameters
        params = list(signature)
        launched[kind] = {p: v for p, v in zip(params, args) if isinstance(v, int)}
        launched[kind].update({p: v for p, v in const.items()  # runtime ints passed by name, if any
                               if signature[p].annotation is inspect.Parameter.empty})
        consts[kind] = (const, config)

    monkeypatch.setattr(op, "_launch", record)
    monkeypatch.setattr(backend, "interpret", lambda: True)
    c_in, c_out = (8, 6) if groups < 4 else (64, 64)  # 16 channels a group: the interpreter's BLOCK_K divides them
    x = torch.randn(2, c_in, 9, 7).to(memory_format=torch.channels_last)
    w = torch.randn(c_out, c_in // groups, 3, 3)
    b = torch.randn(c_out) if bias else None
    out = op.conv_bias_relu_forward(x, w, b, [stride, stride], [1, 1], [1, 1], groups)
    op.conv_bias_relu_backward(torch.randn_like(out), x, w, out, [stride, stride], [1, 1], [1, 1], groups,
                               [True, True, bias])
    conv = pm.Conv(2, c_in, 9, 7, c_out, 3, 3, (stride, stride), (1, 1), (1, 1), groups, 4, bias)
    for kind in audit_model.GEMM_PASSES:
        split = launched[kind].get("SPLIT", 1)
        assert launched[kind] == audit_model.launch_ints(kind, conv, split), kind
    for kind, channels in (("fwd", conv.c_in_g), ("dgrad", conv.c_out_g)):
        const, config = consts[kind]
        assert const["EVEN_K"] == (channels % config["BLOCK_K"] == 0)
    const, config = consts["fwd"]
    assert const["EVEN_N"] == (conv.c_out_g % config["BLOCK_N"] == 0)


# A K loop cut from the sm_90 SASS of the forward kernel (128x128x64 bf16), addresses kept, most lines elided.
SASS = """
        /*2510*/                   MOV R1, c[0x0][0x28] ;
        /*2520*/                   DEPBAR.LE SB0, 0x2 ;
        /*2530*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*2730*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*29c0*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*2d30*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR20], R24 ;
        /*2d80*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24, gsb0 ;
        /*3240*/                   LDGDEPBAR ;
        /*3250*/               @P4 BRA 0x2520 ;
        /*3260*/                   IADD3 R2, R2, 0x1, RZ ;
        /*3270*/               @P0 BRA 0x2510 ;
        /*4b30*/                   BRA 0x4b30;
"""


def test_mainloop_is_the_innermost_loop_with_mma():
    assert audit.mainloop(SASS) == ((0x3250 - 0x2520) // 16 + 1, 4)
    assert audit.mainloop(SASS.replace("HGMMA", "FFMA")) is None  # no tensor cores: no K loop reported
    assert audit.mainloop("") is None


def test_targets_say_which_are_met():
    summary = {"min_wgrad_waves": 2.5, "max_backward_hbm_over_min": 3.0}
    met = {t["key"]: t["met"] for t in audit_model.targets(summary)}
    assert met["min_wgrad_waves"] is True and met["max_backward_hbm_over_min"] is False
    assert met["geomean_fwd"] is None


@pytest.mark.slow
def test_audit_model_end_to_end(tmp_path):
    """`cnnperf audit --model vgg16 --batch 2 --arch 90`: every (layer, pass) has a row, compiled clean, with
    the K loop found in the SASS and the issue's figures."""
    out = tmp_path / "model.json"
    status = audit.main(["--model", "vgg16", "--batch", "2", "--arch", "90", "--jobs", "2", "--json", str(out)])
    assert status == 0
    record = json.loads(out.read_text())
    (arch,) = record["archs"]
    assert arch["arch"] == 90 and record["dtype"] == "bfloat16"
    layers = {r["layer"] for r in arch["rows"]}
    assert len(layers) == len(conv_shapes("vgg16", 2))
    fused = {r["layer"] for r in arch["rows"] if r.get("mask_y")}  # the backward GEMMs apply the ReLU mask
    masked = {r["layer"] for r in arch["rows"] if r["pass"] == "mask"}
    assert fused.isdisjoint(masked) and fused | masked == layers
    # no dgrad for the first layer: its input is the images
    assert len(arch["rows"]) == 3 * len(layers) - 1 + len(masked)
    for r in arch["rows"]:
        assert r["predicted_fraction_of_peak"] is None or 0 < r["predicted_fraction_of_peak"] < 1
        if r["pass"] != "mask":
            assert r["compiled"]
            # A folded stem's K loop has a constant trip count (KH x a block or two) that Triton may unroll:
            # no loop left in the SASS. Every other layer's K loop is found.
            if r["mainloop_mma"] is not None or r["shape"]["c_in"] > pm.FOLD_MAX_CHANNELS:
                assert r["mainloop_mma"] > 0 and r["mainloop_instructions"] > r["mainloop_mma"]
            assert 0 < r["useful_mma_fraction"] <= 1 and r["ctas_per_sm"] >= 1
            conv = pm.Conv(**{k: tuple(v) if isinstance(v, list) else v for k, v in r["shape"].items()
                              if k not in ("out_h", "out_w")})
            assert r["config"] == pm.config_label(pm.choose_config(
                r["pass"], conv, audit_model.config_list(r["pass"], "bfloat16"), pm.H200, r["mask_y"]))
    assert {t["key"] for t in arch["targets"]} == {k for k, *_ in audit_model.TARGETS}
    assert 0 < arch["summary"]["geomean_fwd"] < 1


@pytest.mark.parametrize("batch", [32, 128])
def test_resnet50_conv_batchnorm_relu_blocks_move_at_least_25_percent_fewer_bytes_fused(batch):
    """Issue 16's goal, on the static model: ResNet-50's Conv-BN-ReLU blocks (the stem and each bottleneck's
    three convs, the third with the residual add: 49 of 53; the 4 downsampling convs give that residual) in a
    bf16 training step."""
    blocks = audit_model.batch_norm_blocks("resnet50", batch, "bfloat16")
    assert blocks["blocks"] == 49 and blocks["convs"] == 53 and blocks["residual_blocks"] == 16
    assert {r["layer"] for r in blocks["rows"]} >= {"conv1", "layer1.0.conv1", "layer1.0.conv3", "layer4.2.conv2"}
    assert all(r["residual"] == r["layer"].endswith("conv3") for r in blocks["rows"])
    assert not any("downsample" in r["layer"] for r in blocks["rows"])
    assert blocks["fused_over_unfused"] <= 0.75
    assert "49 of 53 convs, 16 with a residual add" in audit_model.batch_norm_blocks_line(blocks)
    # layer1's four 1x1 convs whose dz pass costs more than computing dz in the GEMMs (H200 model)
    assert {r["layer"] for r in blocks["rows"] if r["dz_in_gemms"]} == {
        "layer1.0.conv1", "layer1.0.conv3", "layer1.1.conv3", "layer1.2.conv3"}


def test_batch_norm_block_bytes_count_passes_over_the_conv_output():
    conv = pm.Conv(8, 64, 56, 56, 64, 3, 3, (1, 1), (1, 1), (1, 1), 1, 2, False)
    s = conv.sizes()
    fused = pm.batch_norm_block_kernels(conv, fused=True)
    eager = pm.batch_norm_block_kernels(conv, fused=False)
    extra = sum(b for *_, b in eager) - sum(b for *_, b in fused)
    # eager: BN stats 1, normalise 2, ReLU 2, ReLU backward 3, BN backward 2 + 3; fused: normalise 2, sums 2, dz 3;
    # less the fused passes' fp32 partial sums (2 x 4 B per channel per 128-row tile, and per 64-row block),
    # each written once and read once by its finalize kernel; the per-channel vectors (26 fused, 14 eager: a few
    # KB) are left to the tolerance
    rows, c = 8 * 56 * 56, 64
    workspace = 2 * 2 * 4 * c * (-(-rows // 128) + -(-rows // 64))
    assert abs(extra - (6 * s["y"] - workspace)) < 64 * c * 4
    assert [k for d, k, _ in fused if d == "bwd"][-2:] == ["dgrad", "wgrad"]
    # With the residual: eager adds an add pass (3 Z); fused reads the residual forward (1) and, backward, the
    # output for the mask and writes g (2): the same 6 Z saved.
    extra_residual = (sum(b for *_, b in pm.batch_norm_block_kernels(conv, fused=False, residual=True))
                      - sum(b for *_, b in pm.batch_norm_block_kernels(conv, fused=True, residual=True)))
    assert extra_residual - extra == 0
    # dz computed in the GEMMs: no dz pass (3 Z), one more read of Z in each of dgrad and wgrad; the same
    # with the residual (the GEMMs read g, which the sums pass writes anyway, instead of grad_out).
    for residual in (False, True):
        kernels = pm.batch_norm_block_kernels(conv, fused=True, residual=residual)
        in_gemms = pm.batch_norm_block_kernels(conv, fused=True, residual=residual, dz_in_gemms=True)
        saved = sum(b for *_, b in kernels) - sum(b for *_, b in in_gemms)
        assert abs(saved - s["y"]) < 64 * c * 4
        assert not any(k.startswith("dz") for _, k, _ in in_gemms)


def _bench_record(path, device="NVIDIA H200", rows=2):
    shapes = conv_shapes("vgg16", 2)[:rows]
    record = {"config": {"models": ["vgg16"], "batch": 2, "image_size": 224, "dtype": "bfloat16"}, "rows": []}
    for i, s in enumerate(shapes):
        for pass_, ms in (("fwd", 0.05), ("fwdbwd", 0.2)):
            record["rows"].append({"device": device, "name": s.name, "pass": pass_, "variant": "cnnperf",
                                   "path": "triton", "median_ms": ms})
            if i == 1:  # a record that says what ran, and it is not what the model predicts for
                record["rows"][-1]["configs"] = {"fwd": "16x16x16 w1 s1", "dgrad": "-", "wgrad": "-"}
        record["rows"].append({"device": device, "name": s.name, "pass": "fwd", "variant": "eager", "median_ms": 1})
        record["rows"].append({"device": device, "name": s.name, "pass": "fwd", "variant": "cnnperf",
                               "path": "fwd=reference", "median_ms": 1})  # cuDNN ran: not the model's business
    path.write_text(json.dumps(record))
    return shapes


@pytest.mark.slow
def test_compare_the_model_with_a_benchmark_record(tmp_path):
    bench = tmp_path / "bench.json"
    shapes = _bench_record(bench)
    out = tmp_path / "compare.json"
    assert audit.main(["--compare", str(bench), "--jobs", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["arch"] == 90 and [r["layer"] for r in result["rows"]] == [s.name for s in shapes for _ in "ab"]
    plan = audit_model.compare_plan(json.loads(bench.read_text()), 90)
    model = audit_model.model_rows(plan, audit.compile_passes(plan, 2), 90)
    for r in result["rows"]:
        passes = {m["pass"]: m for m in model if m["layer"] == r["layer"]}
        predicted = 1e3 * sum(passes[k]["seconds"] for k in audit_model.BENCH_PASSES[r["pass"]] if k in passes)
        assert r["predicted_ms"] == pytest.approx(predicted, rel=1e-4)
        assert r["error"] == pytest.approx(predicted / r["measured_ms"] - 1, abs=1e-4)
        assert "dgrad" in passes  # the benchmark's backward reaches the first layer's input too
    assert result["summary"]["fwd"]["rows"] == len(shapes)
    assert [r["same_configs"] for r in result["rows"]] == [None, None, False, False]


def test_launch_configs_are_the_labels_of_what_launches():
    args = ((2, 32, 8, 8), (16, 32, 3, 3), (1, 1), (1, 1), (1, 1), 1, torch.float16, True, torch.device("cpu"))
    pinned = {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 1, "num_warps": 2, "num_stages": 2}
    with op.pinned_configs(dgrad=pinned):
        labels = op.launch_configs(*args)
    assert labels["dgrad"] == "64x32x16 w2 s2"
    if backend.interpret():
        assert labels["fwd"] == pm.config_label(op._kernels().INTERPRET_FWD_CONFIG)
    else:
        assert labels["fwd"] == "autotuned"  # the CPU without the interpreter: no config of ours would run


def test_compare_usage_errors(tmp_path, capsys):
    bench = tmp_path / "bench.json"
    _bench_record(bench, device="Some GPU")
    assert audit.main(["--compare", str(bench)]) == 2
    assert "pass --arch 80 or 90" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{}")
    assert audit.main(["--compare", str(tmp_path / "bad.json")]) == 2
    assert audit.main(["--compare", str(bench), "--model", "vgg16"]) == 2
    assert audit_model.arch_of("NVIDIA H100 80GB HBM3") == 90 and audit_model.arch_of("NVIDIA A100-SXM4-40GB") == 80
