"""cnnperf.fuse (cnnperf/fusion.py): which layers it fuses, that the fused model computes the same outputs and
gradients, and that it leaves the input model alone.

Models are float64 where outputs are compared, so that the comparison (cnnperf.testing, float64 row) sees only
the rounding of BatchNorm folding; one test checks a float32 model against its float64 reference.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import cnnperf
from cnnperf import testing
from cnnperf.fusion import REPORT_ATTRIBUTE, FuseReport
from cnnperf.nn import BatchNorm2dInFusedConv, FusedConv2dBatchNormReLU, FusedConv2dBiasReLU

RELU_TARGETS = (F.relu, F.relu_, torch.relu, torch.relu_, "relu", "relu_")


# ---------------------------------------------------------------------------------------------------------
# Models and helpers.
# ---------------------------------------------------------------------------------------------------------

def vgg_net(batchnorm: bool) -> nn.Sequential:
    """VGG-style: nested conv blocks, a bare conv -> ReLU, and a last conv that no ReLU follows. Input 16x16."""

    def block(c_in: int, c_out: int) -> nn.Sequential:
        if batchnorm:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                                 nn.ReLU(inplace=True))
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True))

    return nn.Sequential(block(3, 8), nn.MaxPool2d(2), block(8, 16), nn.Conv2d(16, 16, 1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(16, 4, 1), nn.Flatten(), nn.Linear(4 * 4 * 4, 10))


class FunctionalNet(nn.Module):
    """ReLUs as functions and tensor methods, in-place or not: only torch.fx sees them."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.conv4 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = self.conv3(x).relu_()
        return F.relu(self.conv4(x), inplace=True)


class TwoUsers(nn.Module):
    """``conv``'s output goes to the ReLU and to the add: it must stay a plain conv. ``other`` fuses."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.other = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        return F.relu(self.other(F.relu(y) + y))


class SharedConv(nn.Module):
    """``conv`` is called twice: replacing it would change both calls. ``other`` fuses."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.other = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        x = F.relu(self.conv(x))
        x = F.relu(self.conv(x))
        return F.relu(self.other(x))


class Branchy(nn.Module):
    """Data-dependent control flow, which torch.fx cannot trace; its children still fuse."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.block = FunctionalNet()
        self.block.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        x = self.block(self.features(x))
        if x.sum() > 0:
            x = F.relu(self.head(x))
        return x


class WithFusedLayer(nn.Module):
    """Already has a FusedConv2dBiasReLU, whose forward torch.fx must not trace into."""

    def __init__(self):
        super().__init__()
        self.pre = FusedConv2dBiasReLU(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return F.relu(self.conv(self.pre(x)))


def resnet18() -> nn.Module:
    return torchvision.models.resnet18(weights=None, num_classes=10)


def randomize_batchnorm(model: nn.Module) -> nn.Module:
    """Running statistics and affine parameters away from (0, 1), so that folding them is not a no-op."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                if m.track_running_stats:
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
    return model


def fused_layers(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, (FusedConv2dBiasReLU, FusedConv2dBatchNormReLU))]


def count(model: nn.Module, kind: type) -> int:
    return sum(type(m) is kind for m in model.modules())


def report(model: nn.Module) -> FuseReport:
    return getattr(model, REPORT_ATTRIBUTE)


def relu_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    modules = dict(gm.named_modules())
    return [n for n in gm.graph.nodes
            if (n.op == "call_module" and type(modules[n.target]) is nn.ReLU)
            or (n.op in ("call_function", "call_method") and n.target in RELU_TARGETS)]


def assert_same_outputs(model: nn.Module, fused: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        expected = model(x.clone())
        actual = fused(x.clone())
    testing.assert_close(actual, expected)


# ---------------------------------------------------------------------------------------------------------
# nn.Sequential.
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("batchnorm", [False, True], ids=["plain", "batchnorm"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_sequential_fuses_and_keeps_outputs(batchnorm, mode):
    model = randomize_batchnorm(vgg_net(batchnorm)).double().train(mode == "train")
    fused = cnnperf.fuse(model)

    folds = batchnorm and mode == "eval"
    expected = ["0.0", "2.0", "3"]
    assert fused_layers(fused) == expected
    assert report(fused).fused == expected
    assert report(fused).folded_bn == (["0.1", "2.1"] if folds else [])
    assert report(fused).batch_norm == (["0.1", "2.1"] if batchnorm and not folds else [])
    assert ("6", "followed by Flatten, not a ReLU") in report(fused).skipped
    assert type(fused) is nn.Sequential and type(fused[0]) is nn.Sequential  # structure kept
    # The ReLU (and a folded BatchNorm) become Identity, so the indices stay; a BatchNorm in training mode leaves
    # its state in its place.
    assert type(fused[4]) is nn.Identity and len(fused) == len(model)
    assert count(fused, nn.ReLU) == 0 and count(fused, nn.BatchNorm2d) == 0
    assert count(fused, BatchNorm2dInFusedConv) == (2 if batchnorm and not folds else 0)
    if batchnorm and not folds:
        assert fused[0][0].bn is fused[0][1] and list(fused.state_dict()) == list(model.state_dict())

    assert_same_outputs(model, fused, torch.randn(2, 3, 16, 16, dtype=torch.float64))


def test_fold_keeps_conv_arguments_and_creates_bias():
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2, bias=False, padding_mode="reflect")
    model = randomize_batchnorm(nn.Sequential(conv, nn.BatchNorm2d(6), nn.ReLU())).double().eval()
    fused = cnnperf.fuse(model)

    layer = fused[0]
    assert type(layer) is FusedConv2dBiasReLU
    for attribute in ("stride", "padding", "dilation", "groups", "padding_mode", "kernel_size"):
        assert getattr(layer, attribute) == getattr(conv, attribute), attribute
    assert layer.bias is not None and layer.bias.dtype == torch.float64
    assert conv.bias is None  # the input model's conv is untouched
    assert_same_outputs(model, fused, torch.randn(2, 4, 11, 13, dtype=torch.float64))


def test_fold_float32_matches_float64_reference():
    model = randomize_batchnorm(vgg_net(batchnorm=True)).eval()
    fused = cnnperf.fuse(model)
    assert fused[0][0].weight.dtype == fused[0][0].bias.dtype == torch.float32
    assert report(fused).folded_bn == ["0.1", "2.1"]

    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        actual = fused(x)
        reference = model.double()(x.double())  # the unfused model, converted in place after fusing a copy
    testing.assert_close(actual, reference, torch.float32)


def test_batchnorm_without_affine_is_folded():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False), nn.ReLU())
    model = randomize_batchnorm(model).double().eval()
    fused = cnnperf.fuse(model)
    assert report(fused).folded_bn == ["1"]
    assert_same_outputs(model, fused, torch.randn(2, 3, 8, 8, dtype=torch.float64))


def bn_left_in_training() -> nn.Sequential:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    model[1].train()
    return model


@pytest.mark.parametrize("make, reason", [
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU()).eval(),
     "track_running_stats=False"),
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.MaxPool2d(2)).eval(),
     "followed by BatchNorm2d and MaxPool2d, not a ReLU"),
    (bn_left_in_training, "in training mode although the model is in eval mode"),
], ids=["no-running-stats", "no-relu", "bn-in-training"])
def test_eval_batchnorm_not_folded(make, reason):
    model = randomize_batchnorm(make()).double()
    fused = cnnperf.fuse(model)

    assert [type(m) for m in fused] == [type(m) for m in model]
    assert report(fused).fused == [] and report(fused).folded_bn == []
    [(name, why)] = report(fused).skipped
    assert name == "0" and reason in why
    assert_same_outputs(model, fused, torch.randn(2, 3, 8, 8, dtype=torch.float64))


def test_conv_with_hook_is_not_fused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU())
    model[0].register_forward_hook(lambda module, args, output: None)
    fused = cnnperf.fuse(model)
    assert type(fused[0]) is nn.Conv2d and type(fused[1]) is nn.ReLU
    assert type(fused[2]) is FusedConv2dBiasReLU
    assert "hooks" in dict(report(fused).skipped)["0"]


def _recording_hooks(model, calls):
    """Forward hooks on the model itself and on containers torch.fx would otherwise inline, a pre-hook and a
    backward hook; each records its name, and the forward ones the type they saw where not a real tensor (an fx
    Proxy while tracing)."""
    def forward_hook(name):
        def hook(module, args, output):
            calls.append(name if type(output) is torch.Tensor else f"{name}({type(output).__name__})")
        return hook

    def pre_hook(module, args):
        calls.append("layer1.0:pre" if type(args[0]) is torch.Tensor else f"layer1.0:pre({type(args[0]).__name__})")

    handles = [model.register_forward_hook(forward_hook("model")),
               model.layer4.register_forward_hook(forward_hook("layer4")),
               model.layer1[0].register_forward_pre_hook(pre_hook),
               model.layer2.register_full_backward_hook(lambda module, gin, gout: calls.append("layer2:backward"))]
    return handles


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_hooks_on_the_model_and_on_containers_keep_firing(mode):
    torch.manual_seed(0)
    model = getattr(torchvision.models.resnet18(num_classes=10).double(), mode)()
    calls = []
    _recording_hooks(model, calls)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    fused = cnnperf.fuse(model)
    assert calls == []  # no hook runs while fusing
    out = fused(x)
    out.sum().backward()
    fused_calls, calls[:] = list(calls), []
    expected = model(x)
    expected.sum().backward()
    assert fused_calls == calls == ["layer1.0:pre", "layer4", "model", "layer2:backward"]
    testing.assert_close(out, expected)
    if mode == "eval":  # inside the hooked containers too: 17 Conv2d -> BatchNorm2d (-> add) -> ReLU, as without hooks
        assert {"layer1.0.conv1", "layer4.0.conv2", "layer4.1.conv1"} <= set(report(fused).fused)
        assert len(report(fused).fused) == 17


def test_a_rewritten_module_keeps_its_hooks_and_their_handles():
    model = FunctionalNet().double()
    calls = []
    handle = model.register_forward_hook(lambda module, args, output: calls.append("model"))
    fused = cnnperf.fuse(model, inplace=True)
    assert isinstance(fused, torch.fx.GraphModule) and report(fused).fused
    fused(torch.randn(1, 3, 8, 8, dtype=torch.float64))
    assert calls == ["model"]
    handle.remove()  # the handle the user holds still reaches the hook
    fused(torch.randn(1, 3, 8, 8, dtype=torch.float64))
    assert calls == ["model"]


@pytest.mark.parametrize("name, mode", [("resnet18", "eval"), ("vgg11_bn", "eval"), ("squeezenet1_1", "train")])
def test_input_gradient_of_a_frozen_fused_model(name, mode):
    """Saliency maps and adversarial examples: every parameter frozen, the gradient of the input asked for."""
    torch.manual_seed(0)
    model = getattr(getattr(torchvision.models, name)(num_classes=10).double(), mode)()
    for module in model.modules():  # dropout off: the same function on both sides
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    model.requires_grad_(False)
    fused = cnnperf.fuse(model)
    assert report(fused).fused
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(fused(x).sum(), x)
    (expected,) = torch.autograd.grad(model(x).sum(), x)
    testing.assert_close(grad, expected, name="input gradient")


# ---------------------------------------------------------------------------------------------------------
# torch.fx.
# ---------------------------------------------------------------------------------------------------------

def test_functional_relu_is_fused_through_fx():
    model = FunctionalNet().double()
    fused = cnnperf.fuse(model)

    assert isinstance(fused, torch.fx.GraphModule)
    assert fused_layers(fused) == ["conv1", "conv2", "conv3", "conv4"]
    assert report(fused).fused == ["conv1", "conv2", "conv3", "conv4"]
    assert relu_nodes(fused) == []  # the ReLUs are gone, not left to run twice
    assert_same_outputs(model, fused, torch.randn(2, 3, 8, 8, dtype=torch.float64))


def test_conv_with_two_users_is_not_fused():
    model = TwoUsers().double()
    fused = cnnperf.fuse(model)

    assert type(fused.conv) is nn.Conv2d and type(fused.other) is FusedConv2dBiasReLU
    assert dict(report(fused).skipped)["conv"].startswith("its output has 2 users")
    assert len(relu_nodes(fused)) == 1  # the ReLU of conv stays
    assert_same_outputs(model, fused, torch.randn(2, 3, 8, 8, dtype=torch.float64))


def test_conv_called_twice_is_not_fused():
    model = SharedConv().double()
    fused = cnnperf.fuse(model)

    assert type(fused.conv) is nn.Conv2d and type(fused.other) is FusedConv2dBiasReLU
    assert report(fused).skipped == [("conv", "called 2 times in forward")]
    assert_same_outputs(model, fused, torch.randn(2, 4, 8, 8, dtype=torch.float64))


def test_untraceable_module_fuses_its_children():
    model = Branchy().double()
    fused = cnnperf.fuse(model)

    assert type(fused) is Branchy
    assert [name for name, _ in report(fused).untraced] == [""]
    assert isinstance(fused.block, torch.fx.GraphModule)
    assert fused_layers(fused) == ["features.0", "block.conv1", "block.conv2", "block.conv3", "block.conv4"]
    assert dict(report(fused).skipped)["head"] == "called by a module that torch.fx cannot trace"
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert model(x).sum() > 0  # the branch through head is taken
    assert_same_outputs(model, fused, x)


def test_existing_fused_layer_does_not_stop_tracing():
    model = WithFusedLayer().double()
    fused = cnnperf.fuse(model)
    assert report(fused).untraced == []
    assert fused_layers(fused) == ["pre", "conv"] and report(fused).fused == ["conv"]
    assert_same_outputs(model, fused, torch.randn(2, 3, 8, 8, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------------
# ResNet-18.
# ---------------------------------------------------------------------------------------------------------

BLOCKS_RESNET18 = [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
FOLDABLE_RESNET18 = ["conv1"] + [f"{block}.{conv}" for block in BLOCKS_RESNET18 for conv in ("conv1", "conv2")]


def test_resnet18_eval_folds_stem_and_both_block_convs():
    """Each BasicBlock's conv2 -> bn2 -> add -> relu too: folded, called with the identity (the block's input, or
    its downsampled form, which stays as it is: its BatchNorm's output is that residual)."""
    model = randomize_batchnorm(resnet18()).double().eval()
    fused = cnnperf.fuse(model)

    assert fused_layers(fused) == FOLDABLE_RESNET18
    assert report(fused).folded_bn == [name.replace("conv", "bn") for name in FOLDABLE_RESNET18]
    assert report(fused).residual == [f"{block}.conv2" for block in BLOCKS_RESNET18]
    assert count(fused, nn.BatchNorm2d) == count(fused, nn.Conv2d) == 3  # the downsample pairs
    skipped = dict(report(fused).skipped)
    assert len(skipped) == 3 and skipped["layer2.0.downsample.0"].startswith("followed by BatchNorm2d")
    assert_same_outputs(model, fused, torch.randn(2, 3, 64, 64, dtype=torch.float64))


def test_resnet18_train_fuses_conv_batchnorm_relu_and_trains_the_same():
    """torchvision's resnet18 in training mode: the stem and each BasicBlock's two convs fuse with their
    BatchNorm (17), the second with the residual add before its ReLU; the downsampling convs' BatchNorm gives
    that residual and is left with that reason. Three SGD steps give the same losses, gradients and running
    statistics as the unfused model."""
    model = randomize_batchnorm(resnet18()).double().train()
    fused = cnnperf.fuse(model)

    blocks = [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    names = ["conv1"] + [f"{b}.conv{k}" for b in blocks for k in (1, 2)]
    assert report(fused).fused == names and report(fused).folded_bn == []
    assert report(fused).batch_norm == [n.replace("conv", "bn") for n in names]
    assert report(fused).residual == [f"{b}.conv2" for b in blocks]
    assert dict(report(fused).skipped)["layer2.0.downsample.0"] == (
        "followed by BatchNorm2d, whose output is the residual that fused layer2.0.conv2 adds")
    assert count(fused, nn.BatchNorm2d) == 3 and count(fused, BatchNorm2dInFusedConv) == 17
    assert list(fused.state_dict()) == list(model.state_dict())

    opt_a = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt_b = torch.optim.SGD(fused.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        x, y = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (4,))
        losses = []
        for net, opt in ((model, opt_a), (fused, opt_b)):
            opt.zero_grad()
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        testing.assert_close(losses[1], losses[0], name="loss")
    # Three steps of momentum SGD amplify the rounding of a different summation order (3e-10 measured, over the
    # float64 row's 1e-10): the float32 row.
    for (name, a), b in zip(model.state_dict().items(), fused.state_dict().values()):
        testing.assert_close(b, a, torch.float32, name=name)


def test_fused_resnet18_saves_no_more_for_backward_than_eager():
    """Activation memory: the bytes autograd keeps for the backward (distinct storages) after one forward.
    torchvision's ReLUs are in place: eager keeps z and the ReLU's output (which the next conv keeps too); a fused
    layer keeps z, and with a residual add the output (for the ReLU's mask; not the residual, which a
    downsampling branch would make one more tensor)."""
    model = resnet18().train()
    fused = cnnperf.fuse(model)

    x = torch.randn(2, 3, 32, 32)
    assert 0 < testing.saved_for_backward_bytes(lambda: fused(x)) <= testing.saved_for_backward_bytes(lambda: model(x))


def test_checkpoints_move_both_ways_between_fused_and_unfused():
    model = randomize_batchnorm(vgg_net(batchnorm=True)).train()
    fused = cnnperf.fuse(model)
    other = randomize_batchnorm(vgg_net(batchnorm=True)).train()
    fused.load_state_dict(other.state_dict())  # unfused -> fused
    model.load_state_dict(fused.state_dict())  # fused -> unfused
    for m in (model, fused, other):
        m.eval()
    x = torch.randn(2, 3, 16, 16)
    testing.assert_close(fused(x), other(x).double(), torch.float32)
    testing.assert_close(model(x), other(x).double(), torch.float32)


def test_fused_batchnorm_follows_model_eval_and_is_not_fused_again():
    model = randomize_batchnorm(vgg_net(batchnorm=True)).train()
    fused = cnnperf.fuse(model)
    again = cnnperf.fuse(fused)
    assert report(again).fused == ["3"] or report(again).fused == []
    assert list(again.state_dict()) == list(model.state_dict())
    model.eval()
    fused.eval()
    assert_same_outputs(model.double(), fused.double(), torch.randn(2, 3, 16, 16, dtype=torch.float64))


class ResidualBN(nn.Module):
    """A BasicBlock-like module: conv1 -> bn1 -> relu, and conv2 -> bn2 -> (+ x) -> relu."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + x)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_graph_fuses_batchnorm_and_residual_add_in_training_and_keeps_the_state(mode):
    model = randomize_batchnorm(ResidualBN()).double().train(mode == "train")
    fused = cnnperf.fuse(model)
    x = torch.randn(3, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    testing.assert_close(fused(x), model(x))
    if mode == "eval":  # folded, conv2 called with the residual
        assert report(fused).fused == ["conv1", "conv2"] and report(fused).folded_bn == ["bn1", "bn2"]
        assert report(fused).residual == ["conv2"] and type(fused.conv2) is FusedConv2dBiasReLU
        return
    assert report(fused).fused == ["conv1", "conv2"] and report(fused).batch_norm == ["bn1", "bn2"]
    assert report(fused).residual == ["conv2"]
    assert type(fused.bn1) is BatchNorm2dInFusedConv and fused.conv1.bn is fused.bn1
    assert list(fused.state_dict()) == list(model.state_dict())
    testing.assert_close(fused.bn2.running_var, model.bn2.running_var)
    fused(x).sum().backward()
    grad = x.grad.clone()
    x.grad = None
    model(x).sum().backward()
    testing.assert_close(grad, x.grad, name="grad of the block's input (both paths: conv and residual)")


class SharedBN(nn.Module):
    """One BatchNorm2d called after two convs: in training, fusing it into the first would leave an identity at
    its second call."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.bn = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return F.relu(self.bn(self.conv2(F.relu(self.bn(self.conv1(x))))))


def test_batchnorm_called_twice_is_not_fused_in_training():
    model = SharedBN().double().train()
    fused = cnnperf.fuse(model)
    skipped = dict(report(fused).skipped)
    assert report(fused).fused == [] and "called 2 times in forward" in skipped["conv1"]
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    testing.assert_close(fused(x), model(x))


@pytest.mark.parametrize("make", [lambda: vgg_net(batchnorm=True), lambda: ResidualBN()], ids=["vgg", "residual"])
def test_fused_model_compiles_fullgraph(make):
    model = randomize_batchnorm(make()).train()
    fused = cnnperf.fuse(model)
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 16, 16) if isinstance(model, nn.Sequential) else torch.randn(2, 4, 6, 6)
    testing.assert_close(compiled(x), model(x).double(), torch.float32)
    for (name, a), b in zip(model.state_dict().items(), fused.state_dict().values()):
        testing.assert_close(b, a, torch.float32, name=name)  # running statistics updated alike


class Containers(nn.Module):
    """Blocks in a ModuleList, a parent with a buffer of its own, a module the forward never calls: GraphModule
    alone would keep only what the graph reads, under plain Modules."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(4, 4, 3, padding=1) for _ in range(2)])
        self.bns = nn.ModuleList([nn.BatchNorm2d(4) for _ in range(2)])
        self.norms = nn.Module()
        self.norms.bn = nn.BatchNorm2d(4)
        self.norms.register_buffer("ema_scale", torch.ones(4))
        self.conv3 = nn.Conv2d(4, 4, 1)
        self.unused = nn.Linear(2, 2)

    def forward(self, x):
        for conv, bn in zip(self.convs, self.bns):
            x = F.relu(bn(conv(x)))
        return F.relu(self.norms.bn(self.conv3(x)))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_graph_rewrite_keeps_containers_buffers_and_unused_modules(mode):
    model = randomize_batchnorm(Containers()).double().train(mode == "train")
    fused = cnnperf.fuse(model)
    assert report(fused).fused == ["convs.0", "convs.1", "conv3"]
    folded = {k for k in model.state_dict() if k.startswith(("bns.", "norms.bn."))} if mode == "eval" else set()
    assert set(fused.state_dict()) == set(model.state_dict()) - folded
    assert type(fused.convs) is type(fused.bns) is nn.ModuleList and hasattr(fused, "unused")
    assert type(model.convs[0]) is nn.Conv2d  # the input model's containers are its own
    assert_same_outputs(model, fused, torch.randn(2, 4, 5, 5, dtype=torch.float64))


class ResidualVariants(nn.Module):
    """Residual adds fuse() must get right: a per-channel shift (broadcast), a conv called by keyword, and an
    in-place op between the conv and the add, or between the add and the ReLU (the fused layer would run after
    it, where the ReLU was: not fused)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv3, self.bn3 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv4, self.bn4 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.shift = nn.Parameter(torch.randn(1, 4, 1, 1))

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)) + self.shift)
        x = F.relu(self.bn2(self.conv2(input=x)) + x)
        out = self.bn3(self.conv3(x))
        x.mul_(2.0)
        x = F.relu(out + x)
        total = self.bn4(self.conv4(x)) + x
        x.add_(1.0)
        return F.relu(total) + x


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_residual_adds_that_broadcast_take_keywords_or_follow_an_in_place_op(mode):
    model = randomize_batchnorm(ResidualVariants()).double().train(mode == "train")
    fused = cnnperf.fuse(model)
    assert report(fused).residual == ["conv1", "conv2"]
    skipped = dict(report(fused).skipped)
    assert "with mul_ in place in between" in skipped["conv3"]
    assert "with add_ in place in between" in skipped["conv4"]
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        testing.assert_close(fused(x), model(x))


def test_sync_batchnorm_is_left_with_a_reason():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4), nn.ReLU()).train()
    fused = cnnperf.fuse(model)
    assert fused_layers(fused) == []
    assert "SyncBatchNorm 1, whose statistics are reduced over all processes" in dict(report(fused).skipped)["0"]


# ---------------------------------------------------------------------------------------------------------
# The input model, state_dict, gradients, report.
# ---------------------------------------------------------------------------------------------------------

def snapshot(model: nn.Module):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return state, [(name, type(m)) for name, m in model.named_modules()]


@pytest.mark.parametrize("make", [lambda: vgg_net(batchnorm=True), resnet18, Branchy],
                         ids=["sequential", "resnet18", "untraceable"])
def test_input_model_is_unchanged(make):
    model = randomize_batchnorm(make()).eval()
    state, types = snapshot(model)
    fused = cnnperf.fuse(model)

    assert fused_layers(fused)  # something was fused
    after_state, after_types = snapshot(model)
    assert after_types == types
    assert after_state.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(after_state[key], value), key
    assert not hasattr(model, REPORT_ATTRIBUTE)


def test_inplace_modifies_the_model():
    model = randomize_batchnorm(vgg_net(batchnorm=True)).double().eval()
    reference = cnnperf.fuse(model)
    fused = cnnperf.fuse(model, inplace=True)

    assert fused is model
    assert fused_layers(model) == ["0.0", "2.0", "3"]
    assert "0.1.running_mean" not in model.state_dict()
    assert_same_outputs(reference, model, torch.randn(2, 3, 16, 16, dtype=torch.float64))


def test_inplace_replaces_traced_children():
    model = Branchy().double()
    reference = cnnperf.fuse(model)
    fused = cnnperf.fuse(model, inplace=True)

    assert fused is model and isinstance(model.block, torch.fx.GraphModule)
    assert type(model.features[0]) is FusedConv2dBiasReLU
    assert_same_outputs(reference, model, torch.randn(2, 3, 8, 8, dtype=torch.float64))


@pytest.mark.parametrize("make", [lambda: vgg_net(batchnorm=False), FunctionalNet], ids=["sequential", "fx"])
def test_state_dict_moves_between_fused_and_plain(make):
    fused = cnnperf.fuse(make().double())
    plain = make().double()  # other weights (the seed moved on)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        assert not torch.allclose(fused(x), plain(x))

    other_plain = make().double()
    other_plain.load_state_dict(fused.state_dict())  # strict: the same keys both ways
    assert_same_outputs(fused, other_plain, x)
    fused.load_state_dict(plain.state_dict())
    assert_same_outputs(plain, fused, x)


@pytest.mark.parametrize("make", [lambda: vgg_net(batchnorm=True), lambda: vgg_net(batchnorm=False),
                                  FunctionalNet], ids=["sequential-bn", "sequential", "fx"])
def test_gradients_match_unfused(make):
    model = make().double().train()
    fused = cnnperf.fuse(model)
    assert fused_layers(fused)

    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    grad_out = None
    grads = []
    for net in (model, fused):
        net.zero_grad()
        xi = x.clone().requires_grad_()
        out = net(xi)
        grad_out = torch.randn_like(out) if grad_out is None else grad_out
        out.backward(grad_out)
        grads.append({"input": xi.grad, **{name: p.grad for name, p in net.named_parameters()}})

    expected, actual = grads
    assert actual.keys() == expected.keys()
    for name, grad in expected.items():
        assert grad is not None and actual[name] is not None, name
        testing.assert_close(actual[name], grad, name=f"grad of {name}")


def test_report_is_logged_and_printable(caplog):
    with caplog.at_level(logging.INFO, logger="cnnperf.fuse"):
        fused = cnnperf.fuse(TwoUsers())
    text = str(report(fused))
    assert text.startswith("cnnperf.fuse: 1 Conv2d+ReLU fused (0 with BatchNorm2d in training mode; 0 with "
                           "BatchNorm2d folded; 0 with a residual add), 1 Conv2d left")
    assert "skipped   conv: its output has 2 users" in text
    assert text in caplog.text


def test_rejects_non_module():
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        cnnperf.fuse(lambda x: x)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_layer_stays_on_the_device():
    model = randomize_batchnorm(vgg_net(batchnorm=True)).cuda().eval()
    fused = cnnperf.fuse(model)
    assert {p.device.type for p in fused.parameters()} == {"cuda"}
    assert {p.dtype for p in fused.parameters()} == {torch.float32}

    x = torch.randn(2, 3, 16, 16, device="cuda")
    with torch.no_grad():
        reference = model.double()(x.double())
        actual = fused(x)
    testing.assert_close(actual, reference, torch.float32, tf32=True)
