"""clip_grad_norm_ and grad_norms against torch's clip_grad_norm_ and a float64 oracle, on both backends.

"triton" runs the kernels (through the interpreter without a GPU, so its tensors stay small there);
"reference" is the CPU path. Both must give torch's semantics.
"""

import math
import warnings

import pytest
import torch
import torchvision

import cnnperf
from cnnperf import backend
from cnnperf.testing import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = DEVICE == "cpu"
BACKENDS = ["reference"] + (["triton"] if backend.device_runs_triton(DEVICE) else [])
pytestmark = pytest.mark.kernels


@pytest.fixture(params=BACKENDS)
def name(request) -> str:
    """Each test taking ``name`` runs on every backend that can run here (the kernels through the interpreter
    without a GPU)."""
    return request.param


def _params(sizes, dtypes=(torch.float32,), scale=1.0):
    """Parameters with random gradients, dtypes cycling over ``dtypes``."""
    params = []
    for i, size in enumerate(sizes):
        dtype = dtypes[i % len(dtypes)]
        p = torch.nn.Parameter(torch.randn(size, device=DEVICE).to(dtype))
        p.grad = (torch.randn(size, device=DEVICE) * scale).to(dtype)
        params.append(p)
    return params


def _clone(params):
    clones = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = None if p.grad is None else p.grad.clone()
        clones.append(q)
    return clones


def _oracle(params, max_norm, norm_type):
    """float64 total norm, per-parameter norms and clipped gradients."""
    grads = [p.grad.double() for p in params if p.grad is not None]
    norms = torch.stack([torch.linalg.vector_norm(g, norm_type) for g in grads])
    total = torch.linalg.vector_norm(norms, norm_type)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    return total, norms, [g * coef for g in grads]


def _check_clip(params, max_norm, norm_type, name):
    """clip on ``name``'s backend: total, clipped gradients vs float64 and vs torch's own clip_grad_norm_."""
    dtype = params[0].grad.dtype
    for p in params:
        dtype = torch.promote_types(dtype, p.grad.dtype) if p.grad is not None else dtype
    low = max((p.grad.dtype for p in params if p.grad is not None), key=lambda d: torch.finfo(d).eps)
    torch_params = _clone(params)
    total64, _, clipped64 = _oracle(params, max_norm, norm_type)
    with backend.override(name):
        total = cnnperf.clip_grad_norm_(params, max_norm, norm_type)
    expected = torch.nn.utils.clip_grad_norm_(torch_params, max_norm, norm_type)
    assert total.shape == () and total.device.type == DEVICE and total.dtype == expected.dtype == dtype
    assert_close(total, total64, low, name="total norm")
    assert_close(total, expected.double(), low, name="total norm vs torch")
    grads = [p.grad for p in params if p.grad is not None]
    for i, (g, g64) in enumerate(zip(grads, clipped64)):
        assert_close(g, g64, name=f"clipped grad {i}")
    return total


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_matches_torch_on_resnet18_or_a_small_cnn(name, norm_type):
    if name == "triton" and INTERPRETED:
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.BatchNorm2d(16), torch.nn.Conv2d(16, 8, 3),
                                    torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 10))
        x = torch.randn(2, 3, 8, 8)
    else:
        model = torchvision.models.resnet18(num_classes=10).to(DEVICE)
        x = torch.randn(2, 3, 32, 32, device=DEVICE)
    model(x).square().sum().backward()
    _check_clip(list(model.parameters()), 1.0, norm_type, name)


def test_many_tiny_tensors(name):
    count = 200 if name == "triton" and INTERPRETED else 1000
    params = _params([(i % 7) + 1 for i in range(count)])
    _check_clip(params, 0.5, 2.0, name)


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_mixed_dtypes_and_multi_chunk_tensors(name, norm_type):
    # Under the interpreter CHUNK is 1024 and pass 2 sums 4 chunks a step: partial and whole chunks, and
    # tensors of one step, of a whole step and of three (9300: 10 chunks, the last step partial).
    sizes = [3, 1024, 2500, 4096, (33, 65), 1, 9300]
    params = _params(sizes, (torch.float16, torch.bfloat16, torch.float32), scale=3.0)
    _check_clip(params, 1.0, norm_type, name)


def test_no_clip_below_max_norm_leaves_gradients_bitwise(name):
    params = _params([10, 2000])
    before = [p.grad.clone() for p in params]
    with backend.override(name):
        total = cnnperf.clip_grad_norm_(params, 1e6)
    assert total.item() < 1e6
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before))


def test_none_gradients_are_skipped(name):
    params = _params([5, 6, 7])
    params[1].grad = None
    with backend.override(name):
        norms = cnnperf.grad_norms(params)
    total = _check_clip(params, 0.1, 2.0, name)
    assert params[1].grad is None
    assert norms.per_param.shape == (2,)
    assert_close(norms.total, total.double())


def test_empty_and_all_none(name):
    with backend.override(name):
        assert torch.equal(cnnperf.clip_grad_norm_([], 1.0), torch.tensor(0.0))
        p = torch.nn.Parameter(torch.ones(3))
        assert cnnperf.clip_grad_norm_([p], 1.0).item() == 0.0
        total, per, finite = cnnperf.grad_norms([p])
    assert total.item() == 0.0 and per.numel() == 0 and bool(finite)


def test_single_tensor_and_generator_arguments(name):
    params = _params([4, 5])
    expected = _oracle(params, 1.0, 2.0)[0]
    with backend.override(name):
        got = cnnperf.grad_norms(p for p in params).total
        single = cnnperf.clip_grad_norm_(params[0], 1e9)
    assert_close(got, expected)
    assert_close(single, torch.linalg.vector_norm(params[0].grad.double()))


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_nonfinite_gradients(name, bad):
    params = _params([5, 3000])
    params[1].grad[1234] = bad
    torch_params = _clone(params)
    with backend.override(name):
        norms = cnnperf.grad_norms(params)
        assert not bool(norms.finite)
        with pytest.raises(RuntimeError, match="non-finite"):
            cnnperf.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
        assert torch.equal(params[0].grad, torch_params[0].grad)  # raised before clipping anything
        total = cnnperf.clip_grad_norm_(params, 1.0)
    expected = torch.nn.utils.clip_grad_norm_(torch_params, 1.0)
    assert (total.isnan() and expected.isnan()) or total.item() == expected.item() == math.inf
    for p, q in zip(params, torch_params):
        assert torch.equal(p.grad.isnan(), q.grad.isnan())  # NaN where torch's clip puts NaN


def test_grad_norms_per_parameter(name):
    params = _params([3, 1500, (4, 5)], (torch.float32, torch.float16))
    total64, norms64, _ = _oracle(params, 1.0, 2.0)
    with backend.override(name):
        total, per_param, finite = cnnperf.grad_norms(params)
    assert per_param.shape == (3,) and finite.dtype == torch.bool and bool(finite)
    assert_close(per_param, norms64, torch.float32)
    assert_close(total, total64, torch.float32)


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_cpu_norms_by_size_keep_fp32_accuracy(norm_type):
    """The CPU path takes small fp32 gradients with torch's fp32 foreach kernel (its fast path) and the rest in
    float64; max |g| every one in its own dtype. Per tensor: within a few fp32 ulps of float64 for 2 (sums of
    squares: twice the norm's 6.5e-7 measured at the size limit), exact for inf; NaN propagates; an empty
    gradient gives the identity."""
    from cnnperf import reference

    n = reference.CPU_FP32_NORM_MAX_NUMEL
    torch.manual_seed(0)
    grads = [torch.randn(n) + 1, torch.randn(n + 1), torch.randn(3, 5), torch.randn(2 * n).half(),
             torch.randn(7).bfloat16(), torch.randn(300).double()]
    if norm_type == 2.0:
        grads.append(torch.zeros(0))
    acc = reference.grad_norm_accumulate(grads, norm_type)
    assert acc.dtype == torch.float64 and acc.shape == (len(grads),)
    for i, g in enumerate(grads):
        expected = torch.linalg.vector_norm(g.double(), norm_type)
        if norm_type == 2.0:
            torch.testing.assert_close(acc[i], expected ** 2, rtol=2e-6, atol=0, msg=f"gradient {i}")
        else:
            assert acc[i] == expected, i
    nan = [torch.randn(10), torch.randn(4)]
    nan[0][3] = math.nan
    assert reference.grad_norm_accumulate(nan, norm_type).isnan().tolist() == [True, False]


@pytest.mark.skipif("triton" not in BACKENDS, reason="the plan is the Triton path's")
def test_repeat_calls_reuse_the_plan_and_follow_the_gradients(monkeypatch):
    """A second call on the same parameters skips the per-tensor checks (the host time of a call) while its
    gradients are the same tensors, or new dense ones at the same addresses (``zero_grad(set_to_none=True)``
    then backward); a gradient that moved, a non-dense one, a missing one or other parameters take the full
    path. Every call's result is the float64 oracle's."""
    from cnnperf.ops import grad_norm as gn

    params = _params([10, 3000, (4, 5)])
    full = []
    real = gn._grads
    monkeypatch.setattr(gn, "_grads", lambda ps: full.append(1) or real(ps))

    def clip_checked(expect_full: bool, backend_name="triton"):
        before = len(full)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # auto: the non-dense gradient's reference-path warning
            _check_clip(params, 0.5, 2.0, backend_name)
            assert (len(full) > before) == expect_full
            with backend.override(backend_name):
                norms = cnnperf.grad_norms(params).per_param
        assert_close(norms, _oracle(params, 1.0, 2.0)[1], torch.float32)

    clip_checked(expect_full=True)  # builds the plan
    for p in params:
        p.grad.normal_()  # same tensors, new values
    clip_checked(expect_full=False)
    for p in params:
        p.grad = p.grad.view_as(p.grad)  # new tensor objects at the same addresses
    clip_checked(expect_full=False)
    params[1].grad.data = torch.randn(3000, device=DEVICE)  # the storage moved
    clip_checked(expect_full=True)
    storage = torch.randn(40, device=DEVICE)
    params[2].grad = storage[:20].view(4, 5)  # elsewhere: a new plan
    clip_checked(expect_full=True)
    params[2].grad = storage.as_strided((4, 5), (10, 2))  # at the same address, not dense: the full path
    clip_checked(expect_full=True, backend_name="auto")
    params[2].grad = torch.randn(4, 5, device=DEVICE)
    params[1].grad = None
    clip_checked(expect_full=True)
    params[1].grad = torch.randn(3000, device=DEVICE)
    other = _clone(params)
    before = len(full)
    with backend.override("triton"):
        cnnperf.clip_grad_norm_(other, 0.5)  # other parameters (same count): their own plan
    assert len(full) > before


def test_same_bits_twice(name):
    params = _params([100, 5000, 17], (torch.float32, torch.bfloat16))
    with backend.override(name):
        first = cnnperf.grad_norms(params)
        second = cnnperf.grad_norms(params)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_table_follows_new_gradient_storage(name):
    params = _params([10, 20])
    with backend.override(name):
        cnnperf.grad_norms(params)
        for p in params:
            p.grad = torch.randn_like(p) * 5  # new storages: the cached table must not be reused
        got = cnnperf.grad_norms(params).total
    assert_close(got, _oracle(params, 1.0, 2.0)[0])


def test_other_norm_types_take_the_reference_path(monkeypatch):
    monkeypatch.setattr(backend, "_warned", set())
    params = _params([10, 20])
    torch_params = _clone(params)
    with backend.override("auto"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        total = cnnperf.clip_grad_norm_(params, 0.5, norm_type=1.0)
    expected = torch.nn.utils.clip_grad_norm_(torch_params, 0.5, norm_type=1.0)
    assert_close(total, expected.double())
    if backend.device_runs_triton(DEVICE):
        assert any("norm_type=1.0" in str(c.message) for c in caught)
        with backend.override("triton"), pytest.raises(backend.UnsupportedError, match="norm_type=1.0"):
            cnnperf.clip_grad_norm_(params, 0.5, norm_type=1.0)


def test_grad_scaler_clips_scaled_gradients(name):
    """clip(scaler=) on still-scaled gradients == unscale_ then clip; inf gradients still skip the step."""
    torch.manual_seed(1)
    model = torch.nn.Linear(8, 4).to(DEVICE)
    reference = torch.nn.Linear(8, 4).to(DEVICE)
    reference.load_state_dict(model.state_dict())
    opt, ref_opt = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, reference))
    scaler, ref_scaler = (torch.amp.GradScaler(DEVICE, init_scale=1024.0) for _ in range(2))
    x = torch.randn(16, 8, device=DEVICE)
    scaler.scale(model(x).square().sum()).backward()
    ref_scaler.scale(reference(x).square().sum()).backward()

    with backend.override(name):
        total = cnnperf.clip_grad_norm_(model.parameters(), 0.5, scaler=scaler)
    ref_scaler.unscale_(ref_opt)
    expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
    assert_close(total, expected.double(), torch.float32)
    scaler.step(opt)
    ref_scaler.step(ref_opt)
    for p, q in zip(model.parameters(), reference.parameters()):
        assert_close(p, q.double(), torch.float32)

    # An inf gradient: the step is skipped and the scale backs off, as with GradScaler alone.
    opt.zero_grad()
    scaler.update()
    before = [p.detach().clone() for p in model.parameters()]
    scale_before = scaler.get_scale()
    scaler.scale(model(x).square().sum()).backward()
    model.weight.grad[0, 0] = math.inf
    with backend.override(name):
        cnnperf.clip_grad_norm_(model.parameters(), 0.5, scaler=scaler)
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert scaler.get_scale() < scale_before


@pytest.mark.parametrize("args, exc, words", [
    ((object(), 1.0), TypeError, ["parameters"]),
    (([torch.ones(2), 3], 1.0), TypeError, ["parameters[1]", "int"]),
    (([torch.ones(2)], 1.0, "two"), ValueError, ["two"]),  # torch's float() of the order, its error
])
def test_bad_arguments(args, exc, words):
    with pytest.raises(exc) as err:
        cnnperf.clip_grad_norm_(*args)
    assert all(w in str(err.value) for w in words)


@pytest.mark.parametrize("norm_type", [math.inf, -math.inf, -1.0])
def test_an_empty_gradient_has_no_norm_of_an_order_without_identity(norm_type):
    p, q = torch.zeros(3, requires_grad=True), torch.zeros(0, requires_grad=True)
    p.grad, q.grad = torch.ones(3), torch.zeros(0)
    with pytest.raises(RuntimeError):
        torch.nn.utils.clip_grad_norm_([p, q], 1.0, norm_type)
    with pytest.raises(RuntimeError, match="gradient 1 .shape .0,... it is empty"):
        cnnperf.clip_grad_norm_([p, q], 1.0, norm_type)


def test_integer_gradient_is_rejected():
    p = torch.zeros(3, dtype=torch.int32)
    p.grad = torch.ones(3, dtype=torch.int32)
    with pytest.raises(TypeError, match="torch.int32"):
        cnnperf.grad_norms([p])


@pytest.mark.skipif(DEVICE != "cuda", reason="host synchronisation is a CUDA notion")
def test_no_host_sync_on_cuda():
    params = _params([1000, 70000, 5], (torch.float32, torch.bfloat16))
    cnnperf.clip_grad_norm_(params, 1.0)  # build and cache the table (a pinned host-to-device copy)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cnnperf.clip_grad_norm_(params, 1.0)
        cnnperf.grad_norms(params)
    finally:
        torch.cuda.set_sync_debug_mode("default")
