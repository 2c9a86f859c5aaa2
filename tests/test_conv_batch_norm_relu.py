"""conv2d_batch_norm_relu and FusedConv2dBatchNormReLU on the reference path: BatchNorm2d's exact semantics in
training and eval (statistics, running averages, momentum None, counters, affine / track_running_stats off),
all gradients, argument errors, state_dict, autocast, channels_last, torch.compile, memory saved for backward.
The Triton kernels are tested in tests/test_conv_batch_norm_relu_triton.py."""

import pytest
import torch
import torch.nn.functional as F
from conv_bn_eager import compare_training, eager_twin, randomize
from torch import nn

from cnnperf.functional import conv2d_batch_norm_relu
from cnnperf.nn import BatchNorm2dInFusedConv, FusedConv2dBatchNormReLU
from cnnperf.testing import assert_close, saved_for_backward_bytes

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("kwargs, shape", [
    (dict(in_channels=3, out_channels=5, kernel_size=3, padding=1), (4, 3, 9, 7)),
    (dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=2, dilation=2, groups=2, bias=True),
     (3, 4, 11, 13)),
    (dict(in_channels=6, out_channels=6, kernel_size=3, padding=1, groups=6), (2, 6, 7, 5)),  # depthwise
    (dict(in_channels=3, out_channels=4, kernel_size=(1, 3), padding_mode="reflect", padding=(0, 1)), (2, 3, 5, 6)),
    (dict(in_channels=3, out_channels=4, kernel_size=1, momentum=None), (5, 3, 3, 3)),
    (dict(in_channels=3, out_channels=4, kernel_size=3, affine=False), (2, 3, 6, 6)),
    (dict(in_channels=3, out_channels=4, kernel_size=3, track_running_stats=False), (2, 3, 6, 6)),
    (dict(in_channels=3, out_channels=4, kernel_size=3, momentum=0.5, eps=1e-2), (2, 3, 6, 6)),
    (dict(in_channels=2, out_channels=3, kernel_size=2), (1, 2, 3, 2)),  # batch 1, two values per channel
], ids=["3x3", "strided-dilated-groups-bias", "depthwise", "reflect-1x3", "momentum-none", "no-affine",
        "no-running-stats", "momentum-eps", "batch1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_trains_as_conv_batchnorm_relu(kwargs, shape, dtype):
    layer = randomize(FusedConv2dBatchNormReLU(**kwargs, dtype=dtype))
    compare_training(layer, shape, steps=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_residual_add_before_the_relu(dtype):
    """relu(bn(conv(x)) + residual): a ResNet block's last conv; the residual's gradient is the masked one."""
    layer = randomize(FusedConv2dBatchNormReLU(4, 6, 3, stride=2, padding=1, dtype=dtype))
    compare_training(layer, (3, 4, 7, 8), residual=True)


@pytest.mark.parametrize("case", ["broadcast", "promote", "autocast-float32"])
def test_a_residual_of_another_shape_or_dtype_broadcasts_and_promotes_as_eager(case):
    """What fuse() may hand over from a traced graph (a per-channel shift, a float64 identity) computes what eager's
    add computes: torch's ops take such a residual."""
    layer = randomize(FusedConv2dBatchNormReLU(3, 4, 3, padding=1))
    conv, bn = (m.float() for m in eager_twin(layer))
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    residual = {"broadcast": torch.randn(1, 4, 1, 1), "promote": torch.randn(2, 4, 5, 5, dtype=torch.float64),
                "autocast-float32": torch.randn(2, 4, 5, 5)}[case].requires_grad_(True)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast-float32")
    with autocast:
        got = layer(x, residual)
        expected = torch.relu(bn(conv(x)) + residual)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    torch.testing.assert_close(got, expected)
    got.sum().backward()
    grad = residual.grad.clone()
    residual.grad = None
    expected.sum().backward()
    torch.testing.assert_close(grad, residual.grad)


def test_layer_wants_4d_input_as_batchnorm2d():
    layer = FusedConv2dBatchNormReLU(3, 4, 3, padding=1)
    with pytest.raises(ValueError, match="expected 4D input"):
        layer(torch.randn(3, 5, 5))
    assert conv2d_batch_norm_relu(torch.randn(3, 5, 5), layer.weight, training=True).shape == (4, 3, 3)


def test_channels_last_in_and_out():
    layer = randomize(FusedConv2dBatchNormReLU(4, 8, 3, padding=1))
    compare_training(layer, (2, 4, 6, 6), channels_last=True)
    x = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    assert layer.train()(x).is_contiguous(memory_format=torch.channels_last)  # torch's rule on the CPU


def test_large_batch_mean_is_exact():
    """Activations far from zero mean (offset 50): the variance must not be E[z^2] - mean^2 in float32."""
    layer = randomize(FusedConv2dBatchNormReLU(3, 4, 3))
    compare_training(layer, (4, 3, 8, 8), offset=50.0, steps=2)


def test_one_value_per_channel_is_batchnorms_error():
    layer = FusedConv2dBatchNormReLU(3, 4, 3)
    eager = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    x = torch.randn(1, 3, 3, 3)
    with pytest.raises(ValueError) as expected:
        eager(x)
    with pytest.raises(ValueError) as got:
        layer(x)
    assert str(got.value) == str(expected.value)
    assert layer.bn.num_batches_tracked.item() == eager[1].num_batches_tracked.item() == 1  # both counted first
    layer.eval()
    assert layer(x).shape == (1, 4, 1, 1)  # running statistics: one value is fine


def test_frozen_batchnorm_follows_the_batchnorms_own_mode():
    """Fine-tuning with the BatchNorm in eval mode (a common detection-backbone recipe): the running statistics
    normalise and stay unchanged, while conv weight, gamma and beta still get gradients."""
    layer = randomize(FusedConv2dBatchNormReLU(3, 4, 3, padding=1))
    conv, bn = eager_twin(layer)
    layer.train()
    layer.bn.eval()
    bn.eval()
    running = layer.bn.running_mean.clone()
    x = torch.randn(2, 3, 5, 5)
    out, expected = layer(x), torch.relu(bn(conv(x.double())))
    assert_close(out, expected, torch.float32)
    out.sum().backward()
    expected.sum().backward()
    assert torch.equal(layer.bn.running_mean, running) and layer.bn.num_batches_tracked.item() == 0
    for p, q in ((layer.weight, conv.weight), (layer.bn.weight, bn.weight), (layer.bn.bias, bn.bias)):
        assert_close(p.grad, q.grad, torch.float32)


def test_state_dict_is_conv_plus_bn():
    layer = FusedConv2dBatchNormReLU(3, 4, 3)
    assert set(layer.state_dict()) == {"weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
                                       "bn.num_batches_tracked"}
    assert "bias=False" in repr(layer)


def test_holder_shares_the_batchnorms_state():
    bn = nn.BatchNorm2d(4)
    holder = BatchNorm2dInFusedConv.from_batch_norm(bn)
    assert holder.weight is bn.weight and holder.running_mean is bn.running_mean
    assert set(holder.state_dict()) == set(bn.state_dict())
    x = torch.randn(2, 4, 3, 3)
    assert holder(x) is x
    assert isinstance(holder, nn.BatchNorm2d)


def test_holder_keeps_the_batchnorms_state_dict_hooks():
    bn = nn.BatchNorm2d(4)
    bn._register_state_dict_hook(lambda module, state, prefix, local: state.update({prefix + "seen": 1}))
    assert "seen" in BatchNorm2dInFusedConv.from_batch_norm(bn).state_dict()


def test_from_modules_checks_channels():
    with pytest.raises(ValueError, match="conv has 4 output channels but bn 5 features"):
        FusedConv2dBatchNormReLU.from_modules(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(5))


def test_functional_matches_f_batch_norm():
    x = torch.randn(3, 4, 6, 6, dtype=torch.float64)
    w = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    rm, rv = torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)
    rm2, rv2 = rm.clone(), rv.clone()
    gamma, beta = torch.rand(5, dtype=torch.float64) + 0.5, torch.randn(5, dtype=torch.float64)
    got = conv2d_batch_norm_relu(x, w, None, 1, 1, running_mean=rm, running_var=rv, bn_weight=gamma,
                                 bn_bias=beta, training=True, momentum=0.3, eps=1e-3)
    expected = F.relu(F.batch_norm(F.conv2d(x, w, None, 1, 1), rm2, rv2, gamma, beta, True, 0.3, 1e-3))
    assert_close(got, expected)
    assert_close(rm, rm2)
    assert_close(rv, rv2)
    # Unbatched input, padding='same', no running statistics (batch statistics only).
    got = conv2d_batch_norm_relu(x[0], w, padding="same", training=True)
    expected = F.relu(F.batch_norm(F.conv2d(x[:1], w, padding="same"), None, None, training=True))[0]
    assert_close(got, expected)


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(running_mean=torch.zeros(3), running_var=torch.ones(5)), ValueError, "running_mean must have shape (5,)"),
    (dict(bn_weight=torch.ones(5, 1)), ValueError, "bn_weight must have shape (5,)"),
    (dict(bn_bias=[0.0] * 5), TypeError, "bn_bias must be a torch.Tensor or None"),
    (dict(running_mean=torch.zeros(5)), ValueError, "running_mean and running_var go together"),
    (dict(training=False), ValueError, "running_mean and running_var are None"),
    (dict(training=True, eps=-1.0), ValueError, "eps must be >= 0"),
    (dict(training=True, momentum=float("nan")), ValueError, "momentum must be a finite number"),
    (dict(training=True, running_mean=torch.zeros(5, dtype=torch.int64), running_var=torch.ones(5)), TypeError,
     "running_mean must be a floating-point tensor"),
])
def test_bad_arguments_name_the_argument(kwargs, exc, words):
    x, w = torch.randn(2, 3, 4, 4), torch.randn(5, 3, 3, 3)
    with pytest.raises(exc, match=words.replace("(", r"\(").replace(")", r"\)")):
        conv2d_batch_norm_relu(x, w, **kwargs)
    with pytest.raises(ValueError, match="conv2d_batch_norm_relu: input has 3 channels"):
        conv2d_batch_norm_relu(x, torch.randn(5, 2, 3, 3), training=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_statistics_in_float32(dtype):
    layer = randomize(FusedConv2dBatchNormReLU(4, 8, 3, padding=1))
    conv, bn = nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
    conv.load_state_dict({"weight": layer.weight.detach()})
    bn.load_state_dict(layer.bn.state_dict())
    x = torch.randn(4, 4, 6, 6)
    with torch.autocast("cpu", dtype=dtype):
        got = layer(x)
        expected = torch.relu(bn(conv(x)))
    assert got.dtype == expected.dtype == dtype
    assert layer.bn.running_mean.dtype == torch.float32
    # The oracle: float64 from the same rounded operands.
    z64 = F.conv2d(x.to(dtype).double(), layer.weight.detach().to(dtype).double(), padding=1)
    assert_close(got, torch.relu(F.batch_norm(z64, None, None, bn.weight.double(), bn.bias.double(), True)), dtype)
    assert_close(layer.bn.running_var, bn.running_var.double(), dtype)
    layer.eval()
    with torch.autocast("cpu", dtype=dtype):
        got = layer(x)
    assert got.dtype == dtype
    oracle = F.batch_norm(z64, layer.bn.running_mean.double(), layer.bn.running_var.double(), bn.weight.double(),
                          bn.bias.double(), False)
    assert_close(got, torch.relu(oracle), dtype)
    got.float().sum().backward()
    assert layer.weight.grad.dtype == layer.bn.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("with_residual", [False, True])
def test_gradcheck_and_double_backward_float64(with_residual):
    x = torch.randn(3, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    gamma = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_(True)
    beta = torch.randn(3, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 3, 5, 4, dtype=torch.float64, requires_grad=True)

    def f(x, w, b, gamma, beta, r):
        return conv2d_batch_norm_relu(x, w, b, 1, 1, bn_weight=gamma, bn_bias=beta, training=True,
                                      residual=r if with_residual else None)

    assert torch.autograd.gradcheck(f, (x, w, b, gamma, beta, r))
    assert torch.autograd.gradgradcheck(f, (x, w, b, gamma, beta, r))


@pytest.mark.parametrize("with_residual", [False, True])
def test_opcheck_custom_ops(with_residual):
    x, w = torch.randn(2, 4, 6, 6), torch.randn(6, 2, 3, 3)
    gamma, beta = torch.rand(6) + 0.5, torch.randn(6)
    residual = torch.randn(2, 6, 3, 6) if with_residual else None
    args = (x, w, None, gamma, beta, residual, 1e-5, [2, 1], [1, 1], [1, 1], 2)
    torch.library.opcheck(torch.ops.cnnperf.conv2d_batch_norm_relu.default, args)
    out, z, mean, var = torch.ops.cnnperf.conv2d_batch_norm_relu(*args)
    torch.library.opcheck(torch.ops.cnnperf.conv2d_batch_norm_relu_backward.default,
                          (torch.randn_like(out), x, w, z, mean, var, gamma, beta, out if with_residual else None,
                           1e-5, [2, 1], [1, 1], [1, 1], 2, [True, True, False, True, False, with_residual]))


def test_saves_no_more_activation_memory_than_eager():
    """Saved for backward: input, weight, z and two per-channel vectors; eager Conv2d + BatchNorm2d + ReLU also
    saves the ReLU's output (and the BatchNorm's output when the ReLU is not in place)."""
    layer = FusedConv2dBatchNormReLU(8, 16, 3, padding=1)
    conv, bn = eager_twin(layer)
    conv, bn = conv.float(), bn.float()
    x = torch.randn(4, 8, 16, 16, requires_grad=True)

    fused = saved_for_backward_bytes(lambda: layer(x))
    eager = saved_for_backward_bytes(lambda: torch.relu(bn(conv(x))))
    activation = 4 * 16 * 16 * 16 * 4  # one output-sized fp32 tensor
    assert eager - fused >= activation  # the ReLU's output is not kept


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compile_backend):
    model = nn.Sequential(randomize(FusedConv2dBatchNormReLU(3, 8, 3, padding=1)), nn.MaxPool2d(2),
                          randomize(FusedConv2dBatchNormReLU(8, 8, 3, stride=2, padding=1, momentum=None)),
                          nn.Flatten())
    twin = nn.Sequential(*(m if not isinstance(m, FusedConv2dBatchNormReLU) else nn.Sequential(*eager_twin(m),
                                                                                                  nn.ReLU())
                           for m in model)).float()
    compiled = torch.compile(model, backend=compile_backend, fullgraph=True)
    for _ in range(2):
        x = torch.randn(2, 3, 16, 16)
        got, expected = compiled(x), twin(x)
        assert_close(got, expected.double(), torch.float32)
        got.sum().backward()
        expected.sum().backward()
    assert_close(model[0].weight.grad, twin[0][0].weight.grad.double(), torch.float32)
    assert_close(model[2].bn.running_var, twin[2][1].running_var.double(), torch.float32)
    assert model[2].bn.num_batches_tracked.item() == 2


def test_unbatched_input_with_a_4d_residual_keeps_eagers_rank():
    """(C, H, W) + (1, C, OH, OW) is 4-D in eager: the result keeps the batch dim then (3-D residual: 3-D)."""
    from cnnperf.functional import conv2d_batch_norm_relu

    x, w = torch.randn(3, 5, 5), torch.randn(4, 3, 3, 3)
    for residual, shape in ((torch.randn(1, 4, 5, 5), (1, 4, 5, 5)), (torch.randn(4, 5, 5), (4, 5, 5))):
        got = conv2d_batch_norm_relu(x, w, None, 1, 1, training=True, residual=residual)
        z = torch.nn.functional.conv2d(x.unsqueeze(0), w, None, 1, 1)
        expected = torch.relu(torch.nn.functional.batch_norm(z, None, None, training=True).squeeze(0) + residual)
        assert got.shape == expected.shape == shape
        torch.testing.assert_close(got, expected)
