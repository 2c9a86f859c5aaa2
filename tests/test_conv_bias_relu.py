"""conv2d_bias_relu: argument forms, errors, autograd, autocast, torch.compile, the layer and the backend choice.

These run the reference path (fast on the CPU); the Triton kernels themselves are tested under the
interpreter in test_conv_bias_relu_triton.py against the same float64 oracle.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnperf import backend, reference
from cnnperf.functional import conv2d_bias_relu
from cnnperf.nn import FusedConv2dBiasReLU
from cnnperf.ops import conv_bias_relu as op
from cnnperf.testing import assert_close, check_against_reference, saved_for_backward_bytes


def _tensors(n, c_in, h, w, c_out, k, groups=1, bias=True, dtype=torch.float32):
    x = torch.randn(n, c_in, h, w, dtype=dtype, requires_grad=True) if n else \
        torch.randn(c_in, h, w, dtype=dtype, requires_grad=True)
    kh, kw = (k, k) if isinstance(k, int) else k
    wt = (torch.randn(c_out, c_in // groups, kh, kw, dtype=dtype) / (c_in // groups * kh * kw) ** 0.5)
    b = torch.randn(c_out, dtype=dtype, requires_grad=True) if bias else None
    return x, wt.requires_grad_(), b


ARG_FORMS = [
    dict(stride=1, padding=0, dilation=1),
    dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
    dict(stride=[2, 2], padding=[3, 3], dilation=[1, 1]),
    dict(stride=(1,), padding=(1,), dilation=(2,)),
    dict(padding="valid"),
    dict(padding="same"),
    dict(padding="same", dilation=2),
]


@pytest.mark.parametrize("kwargs", ARG_FORMS, ids=str)
@pytest.mark.parametrize("k", [3, (2, 4), 1])
def test_argument_forms_match_conv2d_relu(kwargs, k):
    x, w, b = _tensors(2, 4, 9, 8, 6, k)
    check_against_reference(lambda x, w, b: conv2d_bias_relu(x, w, b, **kwargs),
                            lambda x, w, b: F.relu(F.conv2d(x, w, b, **kwargs)), [x, w, b])


@pytest.mark.parametrize("case", ["unbatched", "no_bias", "groups", "depthwise", "channels_last"])
def test_input_forms(case):
    groups = {"groups": 2, "depthwise": 6}.get(case, 1)
    x, w, b = _tensors(0 if case == "unbatched" else 2, 6, 7, 7, 6, 3, groups=groups, bias=case != "no_bias")
    if case == "channels_last":
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    out = check_against_reference(
        lambda x, w, b: conv2d_bias_relu(x, w, b, padding=1, groups=groups),
        lambda x, w, b: F.relu(F.conv2d(x, w, b, padding=1, groups=groups)), [x, w, b])
    if case == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("case", ["batched", "unbatched", "broadcast", "promoted"])
def test_residual_added_before_the_relu(case):
    """``relu(conv2d(x, w, b) + residual)`` with every gradient, the residual's too; a residual that broadcasts or
    has another dtype takes torch's ops, which broadcast and promote as eager's add."""
    x, w, b = _tensors(0 if case == "unbatched" else 2, 4, 7, 6, 5, 3)
    shape = {"unbatched": (5, 7, 6), "broadcast": (5, 1, 1)}.get(case, (2, 5, 7, 6))
    r = torch.randn(shape, dtype=torch.float64 if case == "promoted" else torch.float32, requires_grad=True)
    if case == "promoted":  # eager's own dtypes: a float32 conv, the sum in float64
        out = conv2d_bias_relu(x, w, b, padding=1, residual=r)
        expected = F.relu(F.conv2d(x, w, b, padding=1) + r)
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, expected)
        return
    check_against_reference(lambda x, w, b, r: conv2d_bias_relu(x, w, b, padding=1, residual=r),
                            lambda x, w, b, r: F.relu(F.conv2d(x, w, b, padding=1) + r), [x, w, b, r])


def test_residual_of_an_unbatched_input_keeps_eagers_rank_and_dtype_under_autocast():
    x, w, b = _tensors(0, 4, 6, 6, 5, 3)
    r4 = torch.randn(1, 5, 6, 6)
    out = conv2d_bias_relu(x, w, b, padding=1, residual=r4)  # eager: (C, H, W) + (1, C, H, W) is 4-D
    assert out.shape == (1, 5, 6, 6)
    torch.testing.assert_close(out, F.relu(F.conv2d(x, w, b, padding=1) + r4))
    x, w, b = _tensors(2, 4, 6, 6, 5, 3)
    r = torch.randn(2, 5, 6, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a bf16 conv plus a float32 residual: float32, as eager
        out = conv2d_bias_relu(x, w, b, padding=1, residual=r)
        expected = F.relu(F.conv2d(x, w, b, padding=1) + r)
    assert out.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(out, expected)


def test_residual_alone_needs_a_gradient():
    x, w, b = (t.detach() for t in _tensors(2, 4, 6, 6, 5, 3))
    r = torch.randn(2, 5, 6, 6, requires_grad=True)
    out = conv2d_bias_relu(x, w, b, padding=1, residual=r)
    grad = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, r, grad)
    torch.testing.assert_close(got, torch.where(out > 0, grad, 0))
    assert (got == 0).any() and (got != 0).any()


def test_residual_layer_and_gradcheck():
    layer = FusedConv2dBiasReLU(4, 6, 3, padding=1).double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 6, 5, 5, dtype=torch.float64, requires_grad=True)
    assert_close(layer(x, r), F.relu(layer._conv_forward(x, layer.weight, layer.bias) + r), torch.float64)
    assert torch.autograd.gradcheck(lambda x, r: layer(x, r), (x, r))
    frozen = r.detach()  # the residual needs no gradient: the input's and the weight's only
    layer(x, frozen).sum().backward()
    assert x.grad is not None and layer.weight.grad is not None


@pytest.mark.parametrize("residual, exc, words", [
    ("not a tensor", TypeError, "residual must be a torch.Tensor"),
    (torch.zeros(2, 6, 5, 5, dtype=torch.int64), TypeError, "residual must be a floating-point tensor"),
    (torch.zeros(2, 6, 5, 5, device="meta"), RuntimeError, "residual is on meta"),
])
def test_bad_residual_names_it(residual, exc, words):
    x, w, b = _tensors(2, 4, 5, 5, 6, 3)
    with pytest.raises(exc, match=words):
        conv2d_bias_relu(x, w, b, padding=1, residual=residual)


def test_gradcheck_float64():
    x = torch.randn(2, 4, 6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: conv2d_bias_relu(x, w, b, (2, 1), 1, (1, 2), 2), (x, w, b))


def test_opcheck_custom_op():
    """Schema, fake (meta) implementation, autograd registration and dispatch of the custom op."""
    x, w, b = _tensors(2, 4, 8, 8, 6, 3)
    torch.library.opcheck(torch.ops.cnnperf.conv2d_bias_relu.default, (x, w, b, [1, 1], [1, 1], [1, 1], 1))
    r = torch.randn(2, 6, 8, 8, requires_grad=True)
    torch.library.opcheck(torch.ops.cnnperf.conv2d_bias_relu.default, (x, w, b, [1, 1], [1, 1], [1, 1], 1, r))
    x, w, _ = _tensors(2, 4, 8, 8, 6, 3, groups=2)
    torch.library.opcheck(torch.ops.cnnperf.conv2d_bias_relu.default, (x, w, None, [2, 1], [0, 1], [1, 2], 2))
    out = conv2d_bias_relu(x, w, None, (2, 1), (0, 1), (1, 2), 2).detach()
    torch.library.opcheck(torch.ops.cnnperf.conv2d_bias_relu_backward.default,
                          (torch.randn_like(out), x.detach(), w.detach(), out, [2, 1], [0, 1], [1, 2], 2,
                           [True, True, False]))


def test_saves_no_more_activation_memory_than_eager():
    x, w, b = _tensors(2, 8, 16, 16, 16, 3)

    fused = saved_for_backward_bytes(lambda: conv2d_bias_relu(x, w, b, padding=1))
    eager = saved_for_backward_bytes(lambda: F.relu(F.conv2d(x, w, b, padding=1)))
    assert 0 < fused <= eager


def test_autocast_cpu_bfloat16_matches_conv2d():
    conv = nn.Conv2d(4, 8, 3, padding=1)
    fused = FusedConv2dBiasReLU(4, 8, 3, padding=1)
    fused.load_state_dict(conv.state_dict())
    x = torch.randn(2, 4, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.relu(conv(x))
        got = fused(x)
    assert got.dtype == expected.dtype == torch.bfloat16
    oracle = F.relu(F.conv2d(*(t.bfloat16().double() for t in (x, conv.weight, conv.bias)), padding=1))
    assert_close(got, oracle, torch.bfloat16)
    got.float().sum().backward()
    assert fused.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compile_backend):
    model = nn.Sequential(FusedConv2dBiasReLU(3, 8, 3, padding=1), nn.MaxPool2d(2),
                          FusedConv2dBiasReLU(8, 8, 3, stride=2, padding=1), nn.Flatten())
    x = torch.randn(2, 3, 16, 16)
    expected = model(x)
    compiled = torch.compile(model, backend=compile_backend, fullgraph=True)
    got = compiled(x)
    assert_close(got, expected.double(), torch.float32)
    got.sum().backward()
    grad = model[0].weight.grad.clone()
    model.zero_grad()
    expected.sum().backward()
    assert_close(grad, model[0].weight.grad.double(), torch.float32)


def test_torch_compile_fullgraph_with_a_residual():
    """A ResNet block's tail as fuse() leaves it in eval mode: the fused layer called with the identity."""
    layer = FusedConv2dBiasReLU(4, 4, 3, padding=1)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    compiled = torch.compile(lambda x: layer(x, x), backend="aot_eager", fullgraph=True)
    got = compiled(x)
    assert_close(got, F.relu(layer._conv_forward(x, layer.weight, layer.bias) + x).double(), torch.float32)
    (grad,) = torch.autograd.grad(got.sum(), x)
    (expected,) = torch.autograd.grad(F.relu(layer._conv_forward(x, layer.weight, layer.bias) + x).sum(), x)
    assert_close(grad, expected.double(), torch.float32)


def test_torch_compile_under_autocast():
    layer = FusedConv2dBiasReLU(3, 4, 3, padding=1)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(1, 3, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, expected = compiled(x), layer(x)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, expected)


def test_layer_state_dict_round_trip():
    conv = nn.Conv2d(3, 5, (3, 2), stride=2, padding=1, dilation=(1, 2), groups=1, bias=True)
    fused = FusedConv2dBiasReLU(3, 5, (3, 2), stride=2, padding=1, dilation=(1, 2), groups=1, bias=True)
    fused.load_state_dict(conv.state_dict())
    back = nn.Conv2d(3, 5, (3, 2), stride=2, padding=1, dilation=(1, 2))
    back.load_state_dict(fused.state_dict())
    assert fused.state_dict().keys() == conv.state_dict().keys()
    for key, value in conv.state_dict().items():
        assert torch.equal(back.state_dict()[key], value)
    x = torch.randn(2, 3, 10, 9)
    assert_close(fused(x), F.relu(conv(x)).double(), torch.float32)


@pytest.mark.parametrize("padding_mode", ["reflect", "circular", "replicate"])
def test_layer_padding_modes(padding_mode):
    conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode=padding_mode)
    fused = FusedConv2dBiasReLU(3, 4, 3, padding=1, padding_mode=padding_mode)
    fused.load_state_dict(conv.state_dict())
    x = torch.randn(1, 3, 6, 7)
    assert_close(fused(x), F.relu(conv(x)).double(), torch.float32)


def test_from_conv_shares_parameters():
    conv = nn.Conv2d(3, 4, 3, bias=False)
    fused = FusedConv2dBiasReLU.from_conv(conv)
    assert fused.weight is conv.weight and fused.bias is None
    assert isinstance(fused, nn.Conv2d) and fused.kernel_size == (3, 3)
    fused.register_forward_hook(lambda *args: None)
    assert not conv._forward_hooks  # hooks are the layer's own, not shared with conv


# --- bad input: a clear error naming the argument and the shapes -------------------------------------------

@pytest.mark.parametrize("make, exc, words", [
    (lambda: (torch.randn(2, 3, 4, 4, 1), torch.randn(4, 3, 3, 3), None), ValueError, ["input", "(2, 3, 4, 4, 1)"]),
    (lambda: (torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3), None), ValueError, ["weight", "(4, 3, 3)"]),
    (lambda: (torch.randn(2, 5, 8, 8), torch.randn(4, 3, 3, 3), None), ValueError,
     ["5 channels", "(2, 5, 8, 8)", "(4, 3, 3, 3)"]),
    (lambda: (torch.randint(0, 5, (2, 3, 8, 8)), torch.randn(4, 3, 3, 3), None), TypeError,
     ["input", "torch.int64", "(2, 3, 8, 8)"]),
    (lambda: (torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3), torch.randn(5)), ValueError, ["bias", "(5,)"]),
    (lambda: (torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3, device="meta"), None), RuntimeError,
     ["one device", "input (2, 3, 8, 8) on cpu", "weight (4, 3, 3, 3) on meta"]),
    (lambda: (torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3, dtype=torch.float64), None), TypeError,
     ["torch.float32", "torch.float64"]),
    (lambda: (torch.randn(2, 3, 2, 2), torch.randn(4, 3, 3, 3), None), ValueError, ["empty", "(2, 3, 2, 2)"]),
])
def test_bad_input_names_argument_and_shapes(make, exc, words):
    x, w, b = make()
    with pytest.raises(exc) as err:
        conv2d_bias_relu(x, w, b)
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize("kwargs, words", [
    (dict(stride=0), ["stride", ">= 1"]),
    (dict(padding=-1), ["padding", ">= 0"]),
    (dict(dilation=(1, 2, 3)), ["dilation"]),
    (dict(padding="full"), ["padding", "'full'"]),
    (dict(padding="same", stride=2), ["same", "strided"]),
    (dict(groups=2), ["groups=2"]),
    (dict(groups=0), ["groups"]),
])
def test_bad_arguments(kwargs, words):
    x, w, b = _tensors(1, 3, 8, 8, 4, 3)
    with pytest.raises(ValueError) as err:
        conv2d_bias_relu(x, w, b, **kwargs)
    for word in words:
        assert word in str(err.value)


# --- backend choice ---------------------------------------------------------------------------------------

def test_backend_rules(monkeypatch):
    monkeypatch.setattr(backend, "interpreter_problem", lambda: None)  # whatever Triton and NumPy are here
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("CNNPERF_BACKEND", "auto")
    assert backend.choose("op", "cpu", None) == "reference"
    monkeypatch.setenv("CNNPERF_BACKEND", "triton")
    with pytest.raises(backend.UnsupportedError, match="cpu tensors"):
        backend.choose("op", "cpu", None)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.choose("op", "cpu", None) == "triton"
    with pytest.raises(backend.UnsupportedError, match="dtype torch.float64"):
        backend.choose("op", "cpu", "dtype torch.float64 is not covered")
    monkeypatch.setenv("CNNPERF_BACKEND", "fast")
    with pytest.raises(ValueError, match="CNNPERF_BACKEND"):
        backend.choose("op", "cpu", None)
    with backend.override("reference"):
        assert backend.choose("op", "cpu", None) == "reference"


@pytest.mark.parametrize("triton_version, numpy_version, broken", [
    ("3.6.0", "2.4.6", True), ("3.6.0", "2.3.5", False), ("3.7.0", "2.4.0", False), ("3.8.0", "2.5.2", False),
    ("3.5.1", "2.4.0", True), ("3.6.0+git1a2b", "2.4.0rc1", True),
])
def test_an_interpreter_that_cannot_run_is_a_reason_not_a_crash(monkeypatch, triton_version, numpy_version,
                                                                  broken):
    """Triton <= 3.6's interpreter with NumPy >= 2.4 (triton-lang/triton#9171): `triton` names the fix, `auto`
    warns once and takes the reference ops; CUDA tensors are not concerned."""
    import numpy
    triton = pytest.importorskip("triton")

    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    backend.interpreter_problem.cache_clear()
    monkeypatch.setattr(backend, "_warned", set())
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    try:
        problem = backend.interpreter_problem()
        assert (problem is not None) == broken
        if not broken:
            return
        assert triton_version in problem and numpy_version in problem and "numpy<2.4" in problem
        monkeypatch.setenv("CNNPERF_BACKEND", "triton")
        with pytest.raises(backend.UnsupportedError, match="interpreter cannot run"):
            backend.choose("op", "cpu", None)
        monkeypatch.setenv("CNNPERF_BACKEND", "auto")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert [backend.choose("op", "cpu", None) for _ in range(2)] == ["reference", "reference"]
        assert len(caught) == 1 and "interpreter cannot run" in str(caught[0].message)
        if backend.has_triton():
            assert backend.choose("op", "cuda", None) == "triton"
    finally:
        backend.interpreter_problem.cache_clear()


def test_auto_takes_reference_for_float64_with_one_warning(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(backend, "_warned", set())
    x, w, b = _tensors(1, 2, 5, 5, 3, 3, dtype=torch.float64)
    with backend.override("auto"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            out = conv2d_bias_relu(x, w, b)
    messages = [str(c.message) for c in caught if "reference" in str(c.message)]
    assert len(messages) == 1 and "float64" in messages[0]
    assert_close(out, reference.conv2d_bias_relu(x, w, b))


def test_forced_triton_on_float64_raises():
    x, w, b = _tensors(1, 2, 5, 5, 3, 3, dtype=torch.float64)
    if not backend.device_runs_triton("cpu"):
        pytest.skip("Triton cannot run on CPU tensors here")
    with backend.override("triton"), pytest.raises(backend.UnsupportedError, match="float64"):
        conv2d_bias_relu(x, w, b)


def test_pinned_configs_are_the_ones_launched_and_are_restored(monkeypatch):
    pytest.importorskip("triton")
    kernels = op._kernels()
    launched = []

    class Recorder:  # stands for a @triton.jit kernel: kernel[grid](*args, **kwargs)
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append(kwargs)

    monkeypatch.setattr(kernels, "_conv_bias_relu_fwd_kernel", Recorder())
    monkeypatch.setattr(backend, "interpret", lambda: True)
    config = kernels.FWD_CONFIGS_16[1]
    problem = op._problem((1, 4, 5, 5), (4, 4, 3, 3), (1, 1), (1, 1), (1, 1), 1, torch.float16, True)

    def launch():
        chosen = op._config("fwd", problem, torch.float16, torch.device("cpu"))
        op._launch("fwd", torch.float16, chosen, None, (), {"KH": 3})

    with op.pinned_configs(fwd=config):
        launch()
        with op.pinned_configs(fwd={"BLOCK_M": 16, "num_warps": 2}):
            launch()
        launch()
    launch()
    pinned = {"KH": 3, **config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
    assert launched == [pinned, {"KH": 3, "BLOCK_M": 16, "num_warps": 2}, pinned,
                        {"KH": 3, **kernels.INTERPRET_FWD_CONFIG}]
    with pytest.raises(ValueError, match="unknown kernel.*'bwd'"):
        with op.pinned_configs(bwd=config):
            pass


def test_backward_keeps_the_forward_backend_and_configs_on_another_thread(monkeypatch):
    """For CUDA tensors autograd runs the backward on its own device thread, where the caller's
    backend.override and pinned_configs (thread-local) are not seen; here the backward runs on a new thread,
    after the with-block is left."""
    import threading

    if not backend.device_runs_triton("cpu"):
        pytest.skip("Triton cannot run on CPU tensors here")
    kernels = op._kernels()
    config = kernels.DGRAD_CONFIGS_32[0]
    seen = []
    real = op.conv_bias_relu_backward

    def spy(*args):
        seen.append((backend.requested(), getattr(op._pinned, "dgrad", None)))
        return real(*args)

    monkeypatch.setattr(op, "conv_bias_relu_backward", spy)
    x, w, b = _tensors(1, 2, 5, 5, 3, 3)
    for t in (x, w, b):
        t.requires_grad_()
    with backend.override("triton"), op.pinned_configs(dgrad=config):
        out = conv2d_bias_relu(x, w, b, padding=1)
    worker = threading.Thread(target=lambda: out.sum().backward())
    worker.start()
    worker.join()
    assert seen == [("triton", config)]
    assert x.grad is not None and w.grad is not None and b.grad is not None


def test_auto_pick_keeps_the_faster_and_caches(monkeypatch):
    monkeypatch.setattr(op, "_auto_choice", {})
    times = {"t": 2.0, "r": 1.0}
    calls = []

    def timer(fn):
        calls.append(fn())
        return times[calls[-1]]

    assert op._auto_pick("k", lambda: "t", lambda: "r", timer=timer) == "reference"
    times["r"] = 3.0
    assert op._auto_pick("k", lambda: "t", lambda: "r", timer=timer) == "reference"  # cached
    assert op._auto_pick("k2", lambda: "t", lambda: "r", timer=timer) == "triton"
    assert calls == ["t", "r", "t", "r"]


def test_fused_layer_is_fx_traceable():
    model = nn.Sequential(FusedConv2dBiasReLU(3, 4, 3, padding=1), nn.MaxPool2d(2))
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(traced(x), model(x))
