"""The Triton path of FusedConv2dBatchNormReLU (the conv kernel's statistics epilogue, the BatchNorm + ReLU
passes, the GEMMs on dz) against float64 eager Conv2d + BatchNorm2d + ReLU: outputs, all gradients, running
statistics and counters over several steps, then eval. Through Triton's interpreter without a GPU (small
shapes; fp32 and fp16: the interpreter's bf16 tl.dot is wrong, see tests/test_conv_bias_relu_triton.py)."""

import pytest
import torch
from conv_bn_eager import compare_training, randomize

from cnnperf import backend
from cnnperf.nn import FusedConv2dBatchNormReLU

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = [pytest.mark.kernels, pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not backend.device_runs_triton(DEVICE) or backend.interpreter_problem() is not None
                                 and DEVICE == "cpu",
                                 reason="Triton cannot run here (no GPU and no working TRITON_INTERPRET)")]


@pytest.mark.parametrize("kwargs, shape", [
    (dict(in_channels=3, out_channels=5, kernel_size=3, padding=1), (3, 3, 7, 6)),  # partial tiles everywhere
    (dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, groups=2, bias=True), (2, 4, 9, 7)),
    (dict(in_channels=8, out_channels=16, kernel_size=1, momentum=None), (2, 8, 5, 5)),
    (dict(in_channels=3, out_channels=4, kernel_size=3, affine=False, track_running_stats=False), (2, 3, 6, 6)),
    (dict(in_channels=2, out_channels=3, kernel_size=2), (1, 2, 3, 2)),  # two values per channel
    (dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, groups=4), (2, 4, 5, 5)),  # depthwise
], ids=["3x3", "strided-groups-bias", "1x1-momentum-none", "bare", "batch1", "depthwise"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_trains_as_conv_batchnorm_relu(kwargs, shape, dtype):
    layer = randomize(FusedConv2dBatchNormReLU(**kwargs, device=DEVICE))
    with backend.override("triton"):
        compare_training(layer.to(dtype) if dtype != torch.float32 else layer, shape, steps=2, dtype=dtype,
                         channels_last=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_residual_add_before_the_relu(dtype):
    layer = randomize(FusedConv2dBatchNormReLU(4, 6, 3, stride=2, padding=1, device=DEVICE))
    with backend.override("triton"):
        compare_training(layer.to(dtype) if dtype != torch.float32 else layer, (3, 4, 7, 8), steps=2, dtype=dtype,
                         channels_last=True, residual=True)


def test_tiles_combine_to_exact_statistics_far_from_zero():
    """Many row tiles of very different means (offset 30): Chan's combination against float64."""
    layer = randomize(FusedConv2dBatchNormReLU(2, 3, 1, device=DEVICE))
    with backend.override("triton"):
        compare_training(layer, (4, 2, 9, 9), steps=1, offset=30.0, eval_step=False)


def test_nchw_grad_output_and_input():
    layer = randomize(FusedConv2dBatchNormReLU(3, 4, 3, padding=1, device=DEVICE))
    with backend.override("triton"):
        compare_training(layer, (2, 3, 5, 5), steps=1, eval_step=False)


def test_stats_config_is_pinned_or_the_models_pick_from_the_stats_list(monkeypatch):
    """The forward with the statistics epilogue never autotunes (the row tile must be known before the launch)
    and picks from its own list (8 warps for 128-row tiles: the epilogue's registers)."""
    from cnnperf import perf_model as pm
    from cnnperf.kernels import conv_bias_relu as kernels
    from cnnperf.ops import conv_batch_norm_relu as op, conv_bias_relu as cbr

    conv = pm.Conv(32, 64, 56, 56, 64, 3, 3, (1, 1), (1, 1), (1, 1), 1, 2, False)
    pinned = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}
    with cbr.pinned_configs(fwd=pinned):
        assert op._stats_config(conv, torch.bfloat16, torch.device("cuda", 0)) is pinned
    monkeypatch.setattr(backend, "interpret", lambda: False)
    monkeypatch.setattr(cbr, "_gpu", lambda index: pm.H200)
    monkeypatch.setattr(cbr, "_device_index", lambda device: 0)
    monkeypatch.setenv("CNNPERF_AUTOTUNE", "1")  # not for this kernel
    op._model_stats_config.cache_clear()
    picked = op._stats_config(conv, torch.bfloat16, torch.device("cuda", 0))
    labels = [pm.config_label(pm.config_dict(c)) for c in kernels.FWD_STATS_CONFIGS_16]
    assert pm.config_label(picked) in labels
    assert all(c.num_warps == 8 for c in kernels.FWD_STATS_CONFIGS_16 + kernels.FWD_STATS_CONFIGS_32
               if c.kwargs["BLOCK_M"] >= 128)


@pytest.mark.parametrize("op", ["conv2d_bias_relu", "conv2d_batch_norm_relu"])
def test_grad_output_with_a_width_of_one_and_odd_strides(op):
    """An output of width 1 whose gradient comes back transposed (strides (H*C, 1, C, 1)): W's stride says nothing
    there (torch's layout checks ignore a size-1 dim, so ``contiguous`` keeps it); the pixels step by H's.
    Found by review: both backward passes once read the wrong elements (errors of 20 on values of 9)."""
    from cnnperf import functional

    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 3, device=DEVICE, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, device=DEVICE, requires_grad=True)
    lin = torch.randn(4, 4, device=DEVICE)
    kwargs = {"training": True} if op == "conv2d_batch_norm_relu" else {}

    def grads(path):
        with backend.override(path):
            out = getattr(functional, op)(x, w, None, 1, (1, 0), **kwargs)
            loss = (out.squeeze(3).transpose(1, 2) @ lin).square().sum()
            return torch.autograd.grad(loss, (x, w))

    for got, expected in zip(grads("triton"), grads("reference")):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dz_in_gemms", [True, False], ids=["dz-in-gemms", "dz-pass"])
def test_dz_computed_in_the_gemms_or_written_by_a_pass(monkeypatch, dz_in_gemms, residual):
    """Both ways of feeding the BatchNorm's input gradient to the conv's dgrad and wgrad (computed as they load
    grad_out or g and z, or read from a dz pass; a GPU picks per shape) against float64, and the launcher takes
    the one asked for."""
    from cnnperf.ops import conv_batch_norm_relu as op, conv_bias_relu as cbr

    tables = []
    gemms = cbr.conv_gemm_backward
    monkeypatch.setattr(cbr, "conv_gemm_backward", lambda *a, **k: tables.append(k.get("chan")) or gemms(*a, **k))
    # (a GPU would ask the model, which picks the pass for this shape)
    monkeypatch.setattr(op, "_dz_in_gemms", lambda rows_ready, *args: dz_in_gemms and rows_ready)
    layer = randomize(FusedConv2dBatchNormReLU(4, 6, 3, stride=2, padding=1, device=DEVICE))
    with backend.override("triton"):
        compare_training(layer, (3, 4, 7, 8), steps=2, eval_step=False, channels_last=True, residual=residual)
    assert len(tables) == 2 and all((t is not None) == dz_in_gemms for t in tables)


def test_dz_in_the_gemms_needs_their_rows_and_no_conv_bias_gradient():
    from cnnperf.ops import conv_batch_norm_relu as op

    x, w = torch.empty(2, 3, 6, 6), torch.empty(4, 3, 3, 3)
    args = (x, w, [1, 1], [1, 1], [1, 1], 1)
    assert op._dz_in_gemms(True, *args, [True, True, False, True, True, False])  # the interpreter: always
    assert not op._dz_in_gemms(False, *args, [True, True, False, True, True, False])  # NCHW grad_out
    assert not op._dz_in_gemms(True, *args, [True, True, True, True, True, False])  # the conv bias's gradient


@pytest.mark.parametrize("frozen", ["weight", "conv"])
def test_dz_for_a_frozen_conv_weight_or_conv(frozen):
    """A conv bias gradient without the weight's (no wgrad to sum it: the dz pass), and a frozen convolution
    (gamma and beta only: no dz at all), against the reference path. (The conv bias's gradient is zero but for
    rounding: the BatchNorm takes the mean out; so the tolerance is the gradients' scale.)"""
    from cnnperf import functional

    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 5, device=DEVICE).contiguous(memory_format=torch.channels_last)
    w = torch.randn(5, 3, 3, 3, device=DEVICE)
    b = torch.randn(5, device=DEVICE, requires_grad=frozen == "weight")
    gamma = torch.rand(5, device=DEVICE).add_(0.5).requires_grad_(True)
    beta = torch.randn(5, device=DEVICE, requires_grad=True)
    if frozen == "weight":
        x.requires_grad_(True)
    wanted = [t for t in (x, b, gamma, beta) if t.requires_grad]

    def grads(path):
        with backend.override(path):
            out = functional.conv2d_batch_norm_relu(x, w, b, 1, 1, bn_weight=gamma, bn_bias=beta, training=True)
            torch.manual_seed(1)
            return torch.autograd.grad(out, wanted, torch.randn_like(out))

    expected = grads("reference")
    scale = max(e.abs().max().item() for e in expected)
    for got, want in zip(grads("triton"), expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * scale)
