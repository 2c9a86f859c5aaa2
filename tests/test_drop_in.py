"""Drop-in means drop-in: hypothesis over the argument space of every public op, each compared with the PyTorch
code it replaces, on the reference path and through the Triton kernels (the interpreter without a GPU).

- ``conv2d_bias_relu`` against ``F.relu(F.conv2d(...))``: which of input / weight / bias need a gradient, bias
  None / contiguous / strided / offset view, input and weight memory formats and non-contiguous views, empty
  batch and empty channels, groups, every form of stride / padding / dilation, unbatched input, dtypes. Same
  errors (any exception where torch raises one), same shape, dtype and memory format, values and every gradient
  within the tolerance table against float64.
- ``clip_grad_norm_`` against ``torch.nn.utils.clip_grad_norm_``: parameters as a tensor, list, tuple, generator
  or empty generator, None gradients, mixed dtypes, max_norm forms, every kind of order, error_if_nonfinite with
  and without non-finite gradients, gradients made with ``create_graph=True``. Same errors and warnings, same
  returned norm (value, dtype, requires_grad), same clipped gradients.

The ``*_once_differed_from_torch`` tests pin the cases that did (issue 10).
"""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st

import cnnperf
from cnnperf import backend
from cnnperf.functional import conv2d_bias_relu
from cnnperf.testing import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["reference"] + (["triton"] if backend.device_runs_triton(DEVICE) else [])
# The interpreter's bf16 tl.dot is wrong (see test_conv_bias_relu_triton.py): bf16 runs the kernels on a GPU only.
DTYPES = {"reference": [torch.float32, torch.float64, torch.bfloat16],
          "triton": [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])}
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------------------------------------------------
# conv2d_bias_relu
# ---------------------------------------------------------------------------------------------------------

def _layout_view(leaf: torch.Tensor, layout: str) -> torch.Tensor:
    """The tensor the op is called with, made from ``leaf`` (where the gradient lands) by ``layout``."""
    if layout == "contiguous":
        return leaf
    if layout == "channels_last":
        return leaf.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other element of the last dimension (the leaf has it twice as long)
        return leaf[..., ::2]
    if layout == "transposed":  # dense, neither contiguous nor channels_last
        return leaf.transpose(-1, -2).contiguous().transpose(-1, -2)
    raise ValueError(layout)


def _make_leaf(shape, layout, gen):
    """(the float64 values of the leaf, the function that makes the op's argument of shape ``shape`` from the
    leaf). "offset": the argument starts one element into the leaf's storage (a misaligned view)."""
    if layout == "offset":
        return (torch.randn(math.prod(shape) + 1, generator=gen, dtype=torch.float64),
                lambda leaf: leaf[1:].view(shape))
    leaf_shape = (*shape[:-1], 2 * shape[-1]) if layout == "strided" else shape
    return torch.randn(leaf_shape, generator=gen, dtype=torch.float64), lambda leaf: _layout_view(leaf, layout)


@st.composite
def conv_cases(draw, backend_name):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    c_in_g = draw(st.integers(0, 3))
    c_out_g = draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    pair = st.integers(1, 2) | st.tuples(st.integers(1, 3), st.integers(1, 3)) | st.lists(
        st.integers(1, 2), min_size=2, max_size=2)
    padding = draw(st.integers(0, 2) | st.tuples(st.integers(0, 2), st.integers(0, 2))
                   | st.sampled_from(["same", "valid"]))
    return dict(
        n=draw(st.integers(0, 2)), c_in=c_in_g * groups, c_out=c_out_g * groups, h=draw(st.integers(1, 7)),
        w=draw(st.integers(1, 7)), kh=kh, kw=kw, groups=groups, stride=draw(pair), padding=padding,
        dilation=draw(pair), unbatched=draw(st.booleans()),
        input_layout=draw(st.sampled_from(["contiguous", "channels_last", "strided", "offset", "transposed"])),
        weight_layout=draw(st.sampled_from(["contiguous", "channels_last", "strided", "transposed"])),
        bias=draw(st.sampled_from([None, "contiguous", "strided", "offset"])),
        requires_grad=draw(st.tuples(st.booleans(), st.booleans(), st.booleans())),
        dtype=draw(st.sampled_from(DTYPES[backend_name])), seed=draw(st.integers(0, 2**16)))


def _format(t: torch.Tensor) -> tuple[bool, bool]:
    return t.is_contiguous(), t.is_contiguous(memory_format=torch.channels_last)


def check_conv_like_torch(backend_name, case):
    """Run one case through cnnperf and through torch; assert they behave the same."""
    gen = torch.Generator().manual_seed(case["seed"])
    dtype = case["dtype"]
    x_shape = (case["c_in"], case["h"], case["w"]) if case["unbatched"] else (
        case["n"], case["c_in"], case["h"], case["w"])
    masters, makers = [], []
    for shape, layout in ((x_shape, case["input_layout"] if not case["unbatched"] else "contiguous"),
                          ((case["c_out"], case["c_in"] // case["groups"], case["kh"], case["kw"]),
                           case["weight_layout"])):
        m, make = _make_leaf(shape, layout, gen)
        masters.append(m)
        makers.append(make)
    if case["bias"] is not None:
        m, make = _make_leaf((case["c_out"],), case["bias"], gen)
        masters.append(m)
        makers.append(make)
    masters[1] = masters[1] / max(1, case["c_in"] // case["groups"] * case["kh"] * case["kw"]) ** 0.5
    wants = list(case["requires_grad"][:len(masters)])

    def run(fn, leaf_dtype):
        leaves = [m.to(DEVICE, leaf_dtype).requires_grad_(rg) for m, rg in zip(masters, wants)]
        args = [make(leaf) for make, leaf in zip(makers, leaves)]
        if len(args) == 2:
            args.append(None)
        return leaves, fn(*args, case["stride"], case["padding"], case["dilation"], case["groups"])

    def torch_fn(x, w, b, stride, padding, dilation, groups):
        return F.relu(F.conv2d(x, w, b, stride, padding, dilation, groups))

    try:
        _, expected = run(torch_fn, dtype)
    except Exception:  # torch refuses the case: so must cnnperf (its own clear error, any exception type)
        with backend.override(backend_name), pytest.raises(Exception):  # noqa: B017 (any type, see above)
            run(conv2d_bias_relu, dtype)
        return
    ref_leaves, ref = run(torch_fn, torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # float64 on the kernels' path: the reference, with one warning
        with backend.override("auto" if dtype == torch.float64 else backend_name):
            leaves, out = run(conv2d_bias_relu, dtype)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert out.requires_grad == expected.requires_grad
    if DEVICE == "cpu":  # on CUDA the fused op's output is channels_last by design (README)
        assert _format(out) == _format(expected), (out.stride(), expected.stride())
    tf32 = dtype == torch.float32 and DEVICE == "cuda" and torch.backends.cudnn.allow_tf32
    assert_close(out, ref, dtype, tf32=tf32)
    if not out.requires_grad or out.numel() == 0:
        return
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    with backend.override("auto" if dtype == torch.float64 else backend_name):
        grads = torch.autograd.grad(out, [t for t in leaves if t.requires_grad], grad_out.to(dtype))
    ref_grads = torch.autograd.grad(ref, [t for t in ref_leaves if t.requires_grad], grad_out)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert_close(g, r, dtype, tf32=tf32, name=f"gradient {i}")


_CASE = dict(n=2, c_in=3, c_out=4, h=6, w=6, kh=3, kw=3, groups=1, stride=1, padding=1, dilation=1,
             unbatched=False, input_layout="contiguous", weight_layout="contiguous", bias="contiguous",
             requires_grad=(True, True, True), dtype=torch.float32, seed=0)


@pytest.mark.parametrize("backend_name", BACKENDS)
@SETTINGS
@given(data=st.data())
def test_conv2d_bias_relu_is_relu_of_conv2d(backend_name, data):
    check_conv_like_torch(backend_name, data.draw(conv_cases(backend_name)))


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("case", [
    # Only some of input / weight / bias need a gradient: a first layer, a frozen model's input gradient,
    # training the bias alone (the backward returned one empty tensor for two outputs: a custom-op error).
    dict(_CASE, requires_grad=(False, True, True)), dict(_CASE, requires_grad=(True, False, False)),
    dict(_CASE, requires_grad=(False, False, True)), dict(_CASE, requires_grad=(False, True, False), bias=None),
    # A strided and an offset bias view (the kernels read a strided bias as contiguous).
    dict(_CASE, bias="strided"), dict(_CASE, bias="offset"),
    # Empty input channels (torch gives empty output channels), an empty batch.
    dict(_CASE, c_in=0), dict(_CASE, n=0),
    # A contiguous input with a channels_last weight (torch's output is channels_last on the CPU).
    dict(_CASE, weight_layout="channels_last"), dict(_CASE, input_layout="transposed", weight_layout="strided"),
], ids=["weight+bias", "input", "bias", "weight-no-bias", "strided-bias", "offset-bias", "no-in-channels",
        "no-batch", "cl-weight", "odd-views"])
def test_cases_that_once_differed_from_torch(backend_name, case):
    check_conv_like_torch(backend_name, case)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_double_backward_and_forward_mode_ad(backend_name):
    """Gradient penalties differentiate the gradients (create_graph=True); jvp needs forward-mode AD. Both
    worked on torch's conv and failed (an error, a lost tangent) on the fused op."""
    import torch.autograd.forward_ad as fwAD

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, 6, generator=gen, dtype=torch.float64).to(DEVICE)
    w = torch.randn(4, 3, 3, 3, generator=gen, dtype=torch.float64).to(DEVICE) / 3
    b = torch.randn(4, generator=gen, dtype=torch.float64).to(DEVICE)
    dtype = torch.float32
    x32, w32, b32 = (t.to(dtype).requires_grad_() for t in (x, w, b))
    x64, w64, b64 = (t.clone().requires_grad_() for t in (x, w, b))

    def second_order(fn, x, w, b):
        (gx,) = torch.autograd.grad(fn(x, w, b, 1, 1).pow(2).sum(), x, create_graph=True)
        return torch.autograd.grad(gx.pow(2).sum(), [x, w, b])

    with backend.override(backend_name):
        got = second_order(conv2d_bias_relu, x32, w32, b32)
    expected = second_order(lambda *a: F.relu(F.conv2d(*a)), x64, w64, b64)
    for g, e, name in zip(got, expected, ("input", "weight", "bias")):
        assert_close(g, e, dtype, name=f"second-order gradient of {name}")

    tangent = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    with fwAD.dual_level():
        with backend.override(backend_name):
            out = conv2d_bias_relu(fwAD.make_dual(x.to(dtype), tangent.to(dtype)), w.to(dtype), b.to(dtype), 1, 1)
        ref = F.relu(F.conv2d(fwAD.make_dual(x, tangent), w, b, 1, 1))
        got_t, ref_t = fwAD.unpack_dual(out).tangent, fwAD.unpack_dual(ref).tangent
    assert got_t is not None, "the tangent was lost"
    assert_close(got_t, ref_t, dtype, name="tangent")


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("transform", ["grad", "jacrev", "hessian", "jvp", "vmap"])
def test_torch_func_transforms(backend_name, transform):
    """torch.func's transforms failed on the fused op ("must override the setup_context staticmethod")."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, 5, 5, generator=gen, dtype=torch.float32).to(DEVICE)
    w = torch.randn(3, 2, 3, 3, generator=gen, dtype=torch.float32).to(DEVICE) / 3

    def apply(conv):
        def loss(w):
            return conv(x, w, None, 1, 1).pow(2).sum()

        if transform == "jvp":
            return torch.func.jvp(loss, (w,), (torch.ones_like(w),))[1]
        if transform == "vmap":  # over a leading dimension of single images
            return torch.func.vmap(lambda image: conv(image, w, None, 1, 1))(x.unsqueeze(1))
        return getattr(torch.func, transform)(loss)(w)

    with backend.override(backend_name):
        got = apply(conv2d_bias_relu)
    expected = apply(lambda *args: F.relu(F.conv2d(*args)))
    assert_close(got, expected.double(), torch.float32, name=transform)


@pytest.mark.skipif(DEVICE != "cpu", reason="on CUDA the fused op's layouts are channels_last by design (README)")
@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("layout", ["input", "weight", "neither"])
def test_raw_gradients_have_torchs_memory_format(backend_name, layout):
    x = torch.randn(2, 3, 5, 5)
    w = torch.randn(4, 3, 3, 3)
    if layout == "input":
        x = x.contiguous(memory_format=torch.channels_last)
    if layout == "weight":
        w = w.contiguous(memory_format=torch.channels_last)
    grads = {}
    for name, fn in (("torch", lambda x, w: F.relu(F.conv2d(x, w))), ("cnnperf", conv2d_bias_relu)):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        with backend.override(backend_name):
            grads[name] = torch.autograd.grad(fn(xs, ws).sum(), [xs, ws])
    for got, expected in zip(grads["cnnperf"], grads["torch"]):
        assert _format(got) == _format(expected), (got.stride(), expected.stride())


# ---------------------------------------------------------------------------------------------------------
# clip_grad_norm_
# ---------------------------------------------------------------------------------------------------------

_CLIP_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
_ORDERS = [2.0, 2, 1.0, 0.5, 3.0, math.inf, "inf", -math.inf, 0.0, -1.0, -2.0]


@st.composite
def clip_cases(draw, backend_name):
    count = draw(st.integers(0, 5))
    dims = st.integers(1, 6) | st.just(0)
    shapes = [draw(st.lists(dims, min_size=0, max_size=3).map(tuple)) for _ in range(count)]
    kernel_dtypes = [torch.float32, torch.float16, torch.bfloat16]
    dtypes = st.sampled_from(kernel_dtypes if backend_name == "triton" else _CLIP_DTYPES)
    return dict(
        shapes=shapes, dtypes=[draw(dtypes) for _ in shapes],
        has_grad=[draw(st.integers(0, 4)) > 0 for _ in shapes],
        form=draw(st.sampled_from(["list", "tuple", "generator", "tensor"])),
        max_norm=draw(st.sampled_from([1.0, 0.1, 5, 1e3, 0.0]) | st.floats(1e-3, 10.0)),
        norm_type=draw(st.sampled_from(_ORDERS if backend_name == "reference" else [2.0, 2, math.inf, "inf"])),
        error_if_nonfinite=draw(st.booleans()),
        nonfinite=draw(st.sampled_from([None, None, None, math.inf, -math.inf, math.nan])),
        create_graph=draw(st.booleans()), scale=draw(st.sampled_from([1.0, 1e-3, 1e3, 1e4, 1e20])),
        seed=draw(st.integers(0, 2**16)))


def _clip_params(case):
    """The parameters of one case (gradients set), fresh each call: the same values every time."""
    gen = torch.Generator().manual_seed(case["seed"])
    params = []
    for i, (shape, dtype, has_grad) in enumerate(zip(case["shapes"], case["dtypes"], case["has_grad"])):
        p = torch.nn.Parameter((torch.randn(shape, generator=gen, dtype=torch.float64) * case["scale"])
                               .to(DEVICE, dtype))
        if has_grad:
            g = torch.randn(shape, generator=gen, dtype=torch.float64) * case["scale"]
            if case["nonfinite"] is not None and i == 0 and g.numel():
                g.view(-1)[0] = case["nonfinite"]
            if case["create_graph"]:  # a gradient that carries a graph, as create_graph=True makes
                w = torch.ones((), dtype=dtype, device=DEVICE, requires_grad=True)
                p.grad = (g.to(DEVICE, dtype) * w).detach().requires_grad_()
                p.grad = p.grad * w
            else:
                p.grad = g.to(DEVICE, dtype)
        params.append(p)
    return params


def _as_form(params, form):
    if form == "tensor":
        return params[0] if params else (p for p in params)
    if form == "tuple":
        return tuple(params)
    if form == "generator":
        return (p for p in params)
    return params


def check_clip_like_torch(backend_name, case):
    def run(fn):
        params = _clip_params(case)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                total = fn(_as_form(params, case["form"]), case["max_norm"], case["norm_type"],
                           error_if_nonfinite=case["error_if_nonfinite"])
            except Exception as e:
                return params, e, [str(c.message) for c in caught]
        return params, total, [str(c.message) for c in caught if "empty generator" in str(c.message)]

    torch_params, expected, torch_warnings = run(torch.nn.utils.clip_grad_norm_)
    with backend.override(backend_name):
        params, total, our_warnings = run(cnnperf.clip_grad_norm_)
    if isinstance(expected, Exception):
        assert isinstance(total, type(expected)), (expected, total)
        return
    assert not isinstance(total, Exception), total
    assert our_warnings == torch_warnings
    assert total.dtype == expected.dtype and total.shape == expected.shape and total.device == expected.device
    assert total.requires_grad == expected.requires_grad is False
    # Both are as exact as the roughest gradient they summed (torch takes an fp32 gradient's norm in fp32, cnnperf
    # in fp64 on the CPU): compare at that precision.
    rough = max((q.grad.dtype for q in torch_params if q.grad is not None), key=lambda d: torch.finfo(d).eps,
                default=torch.float32)
    assert_close(total, expected.double(), rough, name="total norm")
    for i, (p, q) in enumerate(zip(params, torch_params)):
        if q.grad is None:
            assert p.grad is None
            continue
        assert p.grad.requires_grad == q.grad.requires_grad
        assert_close(p.grad, q.grad.double(), rough, name=f"clipped gradient {i}")


@pytest.mark.parametrize("backend_name", BACKENDS)
@SETTINGS
@given(data=st.data())
def test_clip_grad_norm_is_torchs(backend_name, data):
    check_clip_like_torch(backend_name, data.draw(clip_cases(backend_name)))


_CLIP = dict(shapes=[(3, 4), (5,)], dtypes=[torch.float32, torch.float32], has_grad=[True, True], form="list",
             max_norm=0.5, norm_type=2.0, error_if_nonfinite=False, nonfinite=None, create_graph=False, scale=1.0,
             seed=0)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("case", [
    dict(_CLIP, form="generator", shapes=[], dtypes=[], has_grad=[]),  # torch warns: an empty generator
    dict(_CLIP, create_graph=True),  # torch records neither the norm nor the scaling in the graph
    dict(_CLIP, norm_type=0.0), dict(_CLIP, norm_type=-1.0), dict(_CLIP, norm_type=-math.inf),  # torch takes them
    # A float16 total over 65504 is inf in torch: the gradients are zeroed and error_if_nonfinite raises.
    dict(_CLIP, shapes=[(30,), (30,)], dtypes=[torch.float16] * 2, scale=1e4),
    dict(_CLIP, shapes=[(30,), (30,)], dtypes=[torch.float16] * 2, scale=1e4, error_if_nonfinite=True),
    # |g|^p of fp32 gradients of 1e20 underflows float32 at p = -2: torch's norm is 3.2e19, not inf.
    dict(_CLIP, norm_type=-2.0, scale=1e20),
], ids=["empty-generator", "create-graph", "order-0", "order-minus-1", "order-minus-inf", "fp16-total-overflows",
        "fp16-total-overflows-raises", "order-minus-2-huge"])
def test_clip_cases_that_once_differed_from_torch(backend_name, case):
    if backend_name == "triton" and case["norm_type"] not in (2.0, math.inf):
        backend_name = "auto"  # the kernels' backend refuses these orders by name; auto takes the reference
    check_clip_like_torch(backend_name, case)
