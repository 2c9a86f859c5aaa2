"""The Triton kernels of conv2d_bias_relu against the float64 reference: forward and all three gradients.

Without a GPU they run through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so the shapes
stay small; on a GPU the same tests run the compiled kernels on CUDA tensors. bf16 is left to the GPU run and
the audit: the interpreter's bf16 tl.dot is wrong (max error 9e10 on a 100x70 @ 70x50 product, measured).

Configs: the shape tests launch one fixed config per kernel (the interpreter's small one; on a GPU the smallest
tile of each list, since autotuning every odd test shape would compile and time every config for each);
``test_every_config`` runs each config of the lists on one shape with partial tiles; ``test_autotuned`` (GPU)
goes through the autotuner.
"""

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from cnnperf import backend, reference
from cnnperf.functional import conv2d_bias_relu
from cnnperf.kernels import conv_bias_relu as kernels
from cnnperf.ops import conv_bias_relu as op
from cnnperf.testing import check_against_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])

pytestmark = [pytest.mark.kernels,
              pytest.mark.skipif(not backend.device_runs_triton(DEVICE),
                                 reason="Triton cannot run here (no GPU and TRITON_INTERPRET is not 1)")]

# kernel -> (16-bit list, fp32 list)
CONFIG_LISTS = {"fwd": (kernels.FWD_CONFIGS_16, kernels.FWD_CONFIGS_32),
                "dgrad": (kernels.DGRAD_CONFIGS_16, kernels.DGRAD_CONFIGS_32),
                "wgrad": (kernels.WGRAD_CONFIGS_16, kernels.WGRAD_CONFIGS_32)}


def _tile(config):
    return config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"] * config.kwargs["BLOCK_K"]


def _smallest(dtype):
    """Per kernel, the config with the smallest tile of the list for ``dtype`` (None under the interpreter,
    which launches its own fixed config)."""
    if DEVICE != "cuda":
        return {}
    return {kind: min(lists[dtype.itemsize == 4], key=_tile) for kind, lists in CONFIG_LISTS.items()}


def _case(n, c_in, h, w, c_out, kh, kw, *, stride=1, padding=0, dilation=1, groups=1, bias=True,
          dtype=torch.float32, channels_last=False, grad_layout="nchw", configs=None, frozen=(), residual=False):
    """Run the fused op on the Triton backend and compare output and gradients with the float64 reference.
    ``configs``: the kernels' configs (:func:`cnnperf.ops.conv_bias_relu.pinned_configs`), default one small fixed
    config per kernel. ``channels_last`` with ``grad_layout="nhwc"``: the backward's GEMMs read grad_output and
    the output directly (ReLU mask and bias gradient inside them); otherwise a mask pass writes g first.
    ``frozen``: of "input", "weight", "bias", those that need no gradient. ``residual``: a random tensor of the
    output's shape added before the ReLU, its gradient compared too."""
    x = torch.randn(n, c_in, h, w, device=DEVICE, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    wt = torch.randn(c_out, c_in // groups, kh, kw, device=DEVICE) / (c_in // groups * kh * kw) ** 0.5
    b = torch.randn(c_out, device=DEVICE, dtype=dtype) if bias else None
    inputs = [x, wt.to(dtype), b]
    for name, t in zip(("input", "weight", "bias"), inputs):
        if t is not None:
            t.requires_grad_(name not in frozen)
    args = (stride, padding, dilation, groups)
    if residual:
        shape = torch.nn.functional.conv2d(x.detach(), wt.to(dtype), None, *args).shape
        inputs.append(torch.randn(shape, device=DEVICE, dtype=dtype, requires_grad=True))
    with backend.override("triton"), op.pinned_configs(**(configs if configs is not None else _smallest(dtype))):
        out = conv2d_bias_relu(*inputs[:3], *args, residual=inputs[3] if residual else None)
        grad = torch.randn(out.shape, device=DEVICE, dtype=dtype)
        if grad_layout == "nhwc":
            grad = grad.contiguous(memory_format=torch.channels_last)
        elif grad_layout == "strided":  # neither NCHW nor NHWC: the launcher must copy
            grad = grad.transpose(2, 3).contiguous().transpose(2, 3)
        for t in inputs:
            if t is not None:
                t.grad = None
        tf32 = dtype == torch.float32 and DEVICE == "cuda" and torch.backends.cudnn.allow_tf32
        check_against_reference(lambda x, w, b, *r: conv2d_bias_relu(x, w, b, *args, residual=r[0] if r else None),
                                lambda x, w, b, *r: reference.conv2d_bias_relu(x, w, b, *args, *r),
                                inputs, tf32=tf32, grad_output=grad)
    return out


CASES = {
    "3x3_pad1": dict(n=2, c_in=4, h=7, w=9, c_out=6, kh=3, kw=3, padding=1),
    "odd_sizes": dict(n=3, c_in=5, h=5, w=11, c_out=7, kh=3, kw=3, padding=1),
    "stride2": dict(n=2, c_in=4, h=9, w=8, c_out=5, kh=3, kw=3, stride=2, padding=1),
    "stride2_1x1": dict(n=2, c_in=8, h=7, w=7, c_out=4, kh=1, kw=1, stride=2),
    "dilation2": dict(n=1, c_in=3, h=9, w=9, c_out=4, kh=3, kw=3, padding=2, dilation=2),
    # Over 64 taps (no bitmask word holds them: bounds per iteration) with the per-tap loop (16 channels).
    "9x9_wide": dict(n=1, c_in=16, h=10, w=9, c_out=4, kh=9, kw=9, padding=4),
    # A stride phase with no input row at all (H = 1 < stride): dgrad's phase (1, *) is empty.
    "stride2_one_row": dict(n=1, c_in=16, h=1, w=5, c_out=4, kh=1, kw=3, stride=2, padding=(0, 1)),
    # Channel counts that are multiples of the interpreter's BLOCK_K (16): the K loops run without channel masks.
    "even_channels": dict(n=1, c_in=32, h=6, w=5, c_out=16, kh=3, kw=3, padding=1),
    "even_channels_stride2_groups": dict(n=2, c_in=64, h=7, w=6, c_out=32, kh=3, kw=3, stride=2, padding=1,
                                         groups=2),
    # dgrad's stride phases: a phase reached by every tap or by none (gcd 2), taps 3 apart (gcd 1), a phase
    # with fewer rows than phase (0, 0), and a 1x1 stride-2 layer whose odd phases get no tap at all.
    "stride2_dilation2": dict(n=1, c_in=3, h=9, w=10, c_out=4, kh=3, kw=3, stride=2, padding=1, dilation=2),
    "stride3_dilation2_5x5": dict(n=1, c_in=2, h=11, w=13, c_out=3, kh=5, kw=4, stride=3, padding=(2, 1),
                                  dilation=2),
    "1x1": dict(n=2, c_in=16, h=4, w=5, c_out=24, kh=1, kw=1),
    "7x7_stem": dict(n=1, c_in=3, h=12, w=12, c_out=8, kh=7, kw=7, stride=2, padding=3),
    "batch1_cin3": dict(n=1, c_in=3, h=6, w=6, c_out=4, kh=3, kw=3),
    "rect_kernel": dict(n=2, c_in=4, h=6, w=8, c_out=3, kh=1, kw=3, stride=(1, 2), padding=(0, 1)),
    "groups2": dict(n=2, c_in=8, h=5, w=5, c_out=6, kh=3, kw=3, padding=1, groups=2),
    "depthwise": dict(n=1, c_in=6, h=6, w=6, c_out=6, kh=3, kw=3, padding=1, groups=6),
    "no_bias": dict(n=2, c_in=4, h=6, w=6, c_out=5, kh=3, kw=3, bias=False),
    "wide_channels": dict(n=1, c_in=40, h=3, w=3, c_out=36, kh=3, kw=3, padding=1),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_triton_matches_float64_reference(name, dtype):
    _case(**CASES[name], dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["3x3_pad1", "stride2", "groups2", "1x1"])
def test_residual_added_before_the_relu(name, dtype):
    """relu(conv + bias + residual) in the forward's epilogue (a ResNet block's last conv, eval): output and all
    gradients, the residual's too, in both backward layouts (mask in the GEMMs, or a mask pass)."""
    _case(**CASES[name], dtype=dtype, residual=True)
    _case(**CASES[name], dtype=dtype, residual=True, channels_last=True, grad_layout="nhwc")


def _every_config():
    for kind, lists in CONFIG_LISTS.items():
        for dtypes, configs in zip(([torch.float16] + [torch.bfloat16] * (DEVICE == "cuda"), [torch.float32]), lists):
            for dtype in dtypes:
                for config in configs:
                    label = "x".join(str(config.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
                    yield pytest.param(kind, config, dtype,
                                       id=f"{kind}-{label}-w{config.num_warps}s{config.num_stages}-{dtype}")


@pytest.mark.parametrize("kind, config, dtype", list(_every_config()))
def test_every_config(kind, config, dtype):
    """Each config of each list on a shape with partial tiles in every dimension (338 output pixels, 20 input and
    36 output channels: neither a multiple of 16) and more than one block of the reduction (K = 9 x 20). The other
    two kernels run the first config of their lists (large tiles: few programs for the interpreter to step)."""
    first = {k: lists[dtype.itemsize == 4][0] for k, lists in CONFIG_LISTS.items()}
    _case(2, 20, 13, 13, 36, 3, 3, padding=1, dtype=dtype, configs={**first, kind: config})


SPLIT_K_CASES = {
    "3x3": dict(n=1, c_in=32, h=6, w=5, c_out=20, kh=3, kw=3, padding=1),  # 18 K iterations at BLOCK_K 16
    "stem_fold": dict(n=1, c_in=3, h=11, w=10, c_out=8, kh=7, kw=7, stride=2, padding=3),  # 14, (kw, c) folded
    "stride2_groups": dict(n=2, c_in=32, h=7, w=6, c_out=32, kh=3, kw=3, stride=2, padding=1, groups=2),
}


@pytest.mark.parametrize("split_k", [2, 3, 8])
@pytest.mark.parametrize("case", list(SPLIT_K_CASES))
def test_split_k(case, split_k):
    """fwd and dgrad with their K loop cut into slices (fp32 partials added in order by _split_k_sum_kernel, with
    the forward's bias and ReLU): uneven slices, and with 8 some slices of the shorter phases get no
    iteration at all and must still write their zeros."""
    base = {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 4}
    if DEVICE == "cuda":
        base.update(num_warps=4, num_stages=2)
    configs = {"fwd": {**base, "SPLIT_K": split_k}, "dgrad": {**base, "SPLIT_K": split_k}}
    _case(**SPLIT_K_CASES[case], configs=configs)
    if split_k == 2:  # the slices' sum adds the residual then
        _case(**SPLIT_K_CASES[case], configs=configs, residual=True)


@pytest.mark.skipif(DEVICE != "cuda", reason="the model's pick is for GPUs (the interpreter runs one fixed config)")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_model_pick(dtype):
    """With the performance model's configs, as users run the kernels by default: a ResNet-like 3x3 layer and
    a strided one."""
    _case(4, 64, 14, 14, 64, 3, 3, padding=1, dtype=dtype, configs={})
    _case(4, 32, 15, 15, 48, 3, 3, stride=2, padding=1, dtype=dtype, configs={})


@pytest.mark.parametrize("name", list(CASES))
def test_channels_last_gradients(name):
    """The same cases with channels_last grads: the dgrad and wgrad apply the ReLU mask as they load grad_output
    and the wgrad sums the bias gradient (no mask pass)."""
    _case(**CASES[name], channels_last=True, grad_layout="nhwc")


class _Calls:
    """A kernel that counts its launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.mark.parametrize("channels_last, grad_layout, frozen, mask_pass", [
    (True, "nhwc", (), False),
    (True, "nhwc", ("input",), False),
    (True, "nhwc", ("weight", "bias"), False),  # dgrad alone
    (True, "nhwc", ("weight",), True),  # a bias gradient with no wgrad to sum it in
    (True, "nchw", (), True),  # grad_output's rows are not (N*OH*OW, C) rows: the pass writes them so
    (True, "strided", (), True),
])
def test_mask_pass_only_where_needed(channels_last, grad_layout, frozen, mask_pass, monkeypatch):
    spy = _Calls(kernels._relu_mask_bias_grad_kernel)
    monkeypatch.setattr(kernels, "_relu_mask_bias_grad_kernel", spy)
    _case(2, 16, 6, 5, 16, 3, 3, stride=2, padding=1, channels_last=channels_last, grad_layout=grad_layout,
          frozen=frozen)
    assert spy.launches == int(mask_pass)


def test_the_residual_forward_has_its_own_config_list_pick_and_autotuner(monkeypatch):
    """The epilogue with a residual holds one more tile: its list leaves out what spilled there (`cnnperf audit`),
    the model picks from it, the autotuner tunes over it, and a stored config is kept apart."""
    from cnnperf import perf_model as pm

    conv = pm.Conv(32, 64, 56, 56, 64, 3, 3, (1, 1), (1, 1), (1, 1), 1, 2, False)
    monkeypatch.setattr(backend, "interpret", lambda: False)
    monkeypatch.setattr(op, "_gpu", lambda index: pm.H200)
    monkeypatch.setattr(op, "_device_index", lambda device: 0)
    op.model_config.cache_clear()
    picked = op._config("fwd", conv, torch.bfloat16, torch.device("cuda", 0), "residual")
    labels = [pm.config_label(pm.config_dict(c)) for c in kernels.FWD_RESIDUAL_CONFIGS_16]
    assert pm.config_label(pm.config_dict(picked)) in labels
    assert kernels.conv_bias_relu_fwd_autotuned(torch.bfloat16, residual=True).configs == \
        kernels.FWD_RESIDUAL_CONFIGS_16
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "GPU")
    assert " | fwd residual | " in op._cache_entry("fwd", conv, torch.bfloat16, torch.device("cuda", 0), "residual")
    op.model_config.cache_clear()


def test_the_autotuner_tunes_each_backward_variant_apart():
    """The ReLU mask and the BatchNorm's dz change the GEMMs' K loop (and their registers): a variant must not
    inherit the config another won for the same shape, so both constexprs are in the autotuner's key."""
    from cnnperf.kernels import conv_bias_relu as K

    for tuner in (*K._DGRAD.values(), *K._WGRAD.values()):
        assert {"MASK_Y", "BN_GRAD"} <= set(tuner.keys) <= set(tuner.arg_names)


@pytest.mark.skipif(DEVICE != "cuda", reason="the interpreter cannot autotune (it has no GPU to time configs)")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_autotuned(dtype, monkeypatch):
    """Through the autotuner (CNNPERF_AUTOTUNE=1): on a ResNet-like 3x3 layer."""
    monkeypatch.setenv("CNNPERF_AUTOTUNE", "1")
    _case(4, 64, 14, 14, 64, 3, 3, padding=1, dtype=dtype, configs={})


@pytest.mark.parametrize("grad_layout", ["nchw", "nhwc", "strided"])
def test_input_and_grad_layouts(grad_layout):
    out = _case(2, 4, 6, 6, 5, 3, 3, padding=1, channels_last=True, grad_layout=grad_layout)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_same_bits_twice():
    x = torch.randn(2, 6, 7, 7, device=DEVICE, requires_grad=True)
    w = torch.randn(8, 6, 3, 3, device=DEVICE, requires_grad=True)
    b = torch.randn(8, device=DEVICE, requires_grad=True)
    results = []
    with backend.override("triton"), op.pinned_configs(**_smallest(torch.float32)):
        for _ in range(2):
            x.grad = w.grad = b.grad = None
            out = conv2d_bias_relu(x, w, b, stride=2, padding=1)
            out.backward(torch.ones_like(out))
            results.append([out.detach().clone(), x.grad.clone(), w.grad.clone(), b.grad.clone()])
    for first, second in zip(*results):
        assert torch.equal(first, second)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 2), groups=st.sampled_from([1, 2]), c_in_g=st.integers(1, 5), c_out_g=st.integers(1, 5),
       h=st.integers(1, 8), w=st.integers(1, 8), kh=st.integers(1, 4), kw=st.integers(1, 4),
       stride=st.tuples(st.integers(1, 3), st.integers(1, 3)), padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
       dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)), bias=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16]), channels_last=st.booleans())
def test_fuzz_shapes_and_arguments(n, groups, c_in_g, c_out_g, h, w, kh, kw, stride, padding, dilation, bias, dtype,
                                   channels_last):
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    assume(oh > 0 and ow > 0)  # an empty output is an error, tested in test_conv_bias_relu.py
    _case(n, c_in_g * groups, h, w, c_out_g * groups, kh, kw, stride=stride, padding=padding, dilation=dilation,
          groups=groups, bias=bias, dtype=dtype, channels_last=channels_last,
          grad_layout="nhwc" if channels_last else "nchw")


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(groups=st.sampled_from([1, 2]), c_in_g=st.sampled_from([16, 19, 32]), c_out_g=st.sampled_from([3, 16, 21]),
       h=st.integers(1, 7), w=st.integers(1, 7), kh=st.integers(1, 3), kw=st.integers(1, 3),
       stride=st.tuples(st.integers(1, 2), st.integers(1, 2)), padding=st.tuples(st.integers(0, 1), st.integers(0, 1)),
       dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)), dtype=st.sampled_from([torch.float32, torch.float16]),
       channels_last=st.booleans())
def test_fuzz_wide_channels(groups, c_in_g, c_out_g, h, w, kh, kw, stride, padding, dilation, dtype, channels_last):
    """As above with 16 or more input channels a group: the per-tap K loop (no (kw, c) fold), with and without
    channel masks (EVEN_K), rather than the folded one the small fuzzed channel counts take."""
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    assume(oh > 0 and ow > 0)
    _case(1, c_in_g * groups, h, w, c_out_g * groups, kh, kw, stride=stride, padding=padding, dilation=dilation,
          groups=groups, dtype=dtype, channels_last=channels_last, grad_layout="nhwc" if channels_last else "nchw")
