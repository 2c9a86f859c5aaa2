"""The doctor's model zoo (cnnperf.zoo.models): logits of the right shape for the natural data shapes,
gradients that reach every parameter, no softmax at the end, the ConvNet's size and that it learns, the errors."""

import pytest
import torch
from torch import nn

from cnnperf.zoo.data import load_data
from cnnperf.zoo.models import MODELS, ModelError, build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _conv(cin, cout, k):
    return cout * cin * k * k + cout


def _linear(fin, fout):
    return fout * fin + fout


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("channels, size, classes", [(1, 28, 10), (3, 32, 7)], ids=["1x28x28", "3x32x32"])
def test_logits_for_the_natural_shapes(name, channels, size, classes):
    model = build_model(name, in_channels=channels, num_classes=classes, image_size=size)
    with torch.no_grad():
        logits = model(torch.randn(3, channels, size, size))
    assert logits.shape == (3, classes) and logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert not torch.allclose(logits.softmax(1).sum(1), logits.sum(1))  # logits, not probabilities


@pytest.mark.parametrize("name", ["convnet", "lenet5", "alexnet_small", "vgg11_small"])
def test_small_models_take_64_pixel_images(name):
    model = build_model(name, in_channels=3, num_classes=5, image_size=64)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 5)


@pytest.mark.parametrize("name", MODELS)
def test_every_parameter_gets_a_gradient(name):
    model = build_model(name, in_channels=2, num_classes=4, image_size=16)
    loss = nn.functional.cross_entropy(model(torch.randn(6, 2, 16, 16)), torch.tensor([0, 1, 2, 3, 0, 1]))
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", MODELS)
def test_the_last_layer_is_linear_and_there_is_no_softmax(name):
    model = build_model(name, in_channels=1, num_classes=10, image_size=16)
    assert not any(isinstance(m, (nn.Softmax, nn.LogSoftmax, nn.Softmin)) for m in model.modules())
    called = []
    for module in model.modules():
        if not list(module.children()):
            module.register_forward_hook(lambda m, args, out: called.append(m))
    with torch.no_grad():
        model(torch.randn(2, 1, 16, 16))
    assert isinstance(called[-1], nn.Linear) and called[-1].out_features == 10
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert relus and not any(m.inplace for m in relus)  # hooks can read every ReLU's output


def test_convnet_parameter_count_follows_the_image_size():
    # conv 3x3 (no padding) -> 2x2 max-pool, twice: 28 -> 26 -> 13 -> 11 -> 5; 32 -> 30 -> 15 -> 13 -> 6.
    for channels, size, side in ((1, 28, 5), (3, 32, 6)):
        expected = (_conv(channels, 32, 3) + _conv(32, 64, 3) + _linear(64 * side * side, 128) + _linear(128, 10))
        model = build_model("convnet", in_channels=channels, num_classes=10, image_size=size)
        assert sum(p.numel() for p in model.parameters()) == expected
    assert expected == 315_722
    assert _conv(1, 32, 3) + _conv(32, 64, 3) + _linear(64 * 5 * 5, 128) + _linear(128, 10) == 225_034


def test_lenet5_sizes():
    # conv 5x5 padding 2 -> pool -> conv 5x5 -> pool: 28 -> 28 -> 14 -> 10 -> 5; 32 -> 32 -> 16 -> 12 -> 6.
    for channels, size, side in ((1, 28, 5), (3, 32, 6)):
        expected = (_conv(channels, 6, 5) + _conv(6, 16, 5) + _linear(16 * side * side, 120) + _linear(120, 84)
                    + _linear(84, 10))
        model = build_model("lenet5", in_channels=channels, num_classes=10, image_size=size)
        assert sum(p.numel() for p in model.parameters()) == expected
    assert expected == 83_126


def test_convnet_learns_a_fixed_batch_of_digits():
    images, labels = next(iter(load_data("digits", batch_size=64).train_loader))
    model = build_model("convnet", in_channels=1, num_classes=10, image_size=28)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert 2.0 < losses[0] < 2.6  # logits near 0 at initialisation: about ln(10) = 2.30
    assert losses[-1] < 0.8 * losses[0] and losses[1] < losses[0]


def test_dropout_is_off_by_default_and_can_be_asked_for():
    for name in MODELS:
        default = build_model(name, in_channels=1, num_classes=10, image_size=28)
        assert not any(isinstance(m, nn.modules.dropout._DropoutNd) for m in default.modules())
        regularised = build_model(name, in_channels=1, num_classes=10, image_size=28, dropout=0.5)
        dropouts = [m.p for m in regularised.modules() if isinstance(m, nn.Dropout)]
        assert dropouts and all(p == 0.5 for p in dropouts), name
        if not name.startswith("resnet"):  # its fc becomes Sequential(Dropout, Linear); torchvision's Linear without
            assert [n for n, _ in default.named_parameters()] == [n for n, _ in regularised.named_parameters()]
    model = build_model("convnet", in_channels=1, num_classes=10, image_size=28, dropout=0.5).eval()
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(model(x), model(x))  # dropout only in training


def test_resnet18_stem_follows_the_image_size():
    small = build_model("resnet18", in_channels=1, num_classes=10, image_size=28)
    assert (small.conv1.in_channels, small.conv1.kernel_size, small.conv1.stride) == (1, (3, 3), (1, 1))
    assert isinstance(small.maxpool, nn.Identity) and small.fc.out_features == 10
    large = build_model("resnet18", in_channels=1, num_classes=10, image_size=96)
    assert (large.conv1.in_channels, large.conv1.kernel_size, large.conv1.stride) == (1, (7, 7), (2, 2))
    assert isinstance(large.maxpool, nn.MaxPool2d)
    for model, fan_out in ((small, 64 * 3 * 3), (large, 64 * 7 * 7)):  # initialised as torchvision initialises it
        assert model.conv1.weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.1)


def test_vgg11_small_has_the_vgg11_layout_with_batchnorm():
    model = build_model("vgg11_small", in_channels=3, num_classes=10, image_size=32)
    convs = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs == [16, 32, 64, 64, 128, 128, 128, 128]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 8
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 5
    assert sum(isinstance(m, nn.Conv2d) for m in build_model("alexnet_small", in_channels=3, num_classes=10,
                                                             image_size=32).modules()) == 5


def test_unknown_model_and_bad_sizes_raise_model_error():
    with pytest.raises(ModelError) as error:
        build_model("resnet34", in_channels=3, num_classes=10, image_size=32)
    assert isinstance(error.value, ValueError) and all(name in str(error.value) for name in MODELS)
    with pytest.raises(ModelError, match="at least 10x10"):
        build_model("convnet", in_channels=1, num_classes=10, image_size=8)
    with pytest.raises(ModelError, match="at least 12x12"):
        build_model("lenet5", in_channels=1, num_classes=10, image_size=11)
    build_model("lenet5", in_channels=1, num_classes=10, image_size=12)(torch.randn(1, 1, 12, 12))
    build_model("convnet", in_channels=1, num_classes=10, image_size=10)(torch.randn(1, 1, 10, 10))
    for kwargs in (dict(in_channels=0), dict(num_classes=0), dict(image_size=-1), dict(dropout=1.0)):
        args = dict(in_channels=1, num_classes=10, image_size=28) | kwargs
        with pytest.raises(ModelError, match=next(iter(kwargs))):
            build_model("convnet", **args)
