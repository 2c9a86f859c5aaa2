"""``fuse(model)``: each ``Conv2d -> ReLU`` of a model becomes one :class:`cnnperf.nn.FusedConv2dBiasReLU`, each
``Conv2d -> BatchNorm2d -> ReLU`` one :class:`cnnperf.nn.FusedConv2dBatchNormReLU` (training) or a
``FusedConv2dBiasReLU`` with the BatchNorm folded in (eval).

Two ways of finding the pattern, tried from the model down:

- ``nn.Sequential``: consecutive children. The conv becomes the fused layer in its slot, the ReLU (and a folded
  BatchNorm2d) become ``nn.Identity``, so the Sequential keeps its indices and the other layers their
  ``state_dict`` keys. Then each child is fused in turn.
- any other module: ``torch.fx`` tracing. A conv node whose only user is a ReLU (``nn.ReLU``, ``F.relu``,
  ``torch.relu``, ``Tensor.relu``, in-place or not) is fused and the ReLU node removed. If anything was fused,
  the module is replaced by the rewritten ``torch.fx.GraphModule``; it keeps the qualified names of the
  submodules it calls, so the ``state_dict`` keys stay the same. A module that cannot be traced is left as it
  is and its children are fused one by one.

``Conv2d -> BatchNorm2d -> ReLU``: in training mode the conv becomes a ``FusedConv2dBatchNormReLU`` and the
BatchNorm2d a :class:`cnnperf.nn.BatchNorm2dInFusedConv` sharing its parameters and running statistics (so the
``state_dict`` keeps its keys; the ReLU becomes ``nn.Identity`` or leaves the graph); in eval mode the BatchNorm
is folded into the conv's weight and bias for good. In a traced graph a ``Conv2d -> BatchNorm2d -> add -> ReLU``
(a ResNet block's last conv, whose ReLU comes after the residual add) becomes the fused layer (either kind)
called with the other addend, where the ReLU was. A ``Conv2d -> BatchNorm2d`` without a ReLU after it (a
downsampling branch) and ``SyncBatchNorm`` are left as they are, with the reason in the report.
"""

from __future__ import annotations

import copy
import logging
import operator
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from cnnperf import reference
from cnnperf.nn import BatchNorm2dInFusedConv, FusedConv2dBatchNormReLU, FusedConv2dBiasReLU

__all__ = ["fuse", "FuseReport", "REPORT_ATTRIBUTE"]

REPORT_ATTRIBUTE = "cnnperf_fuse_report"  # the attribute of the returned model that holds its FuseReport

_log = logging.getLogger("cnnperf.fuse")  # named for the function users call

_RELU_FUNCTIONS = (F.relu, F.relu_, torch.relu, torch.relu_)
_RELU_METHODS = ("relu", "relu_")
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_")
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
# Everything a Module keeps about its hooks (nn.Module.__init__), handed to the GraphModule that replaces it.
_HOOK_STATE = _HOOK_DICTS + ("_is_full_backward_hook", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                             "_forward_pre_hooks_with_kwargs", "_state_dict_hooks", "_state_dict_pre_hooks",
                             "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


@dataclass
class FuseReport:
    """What :func:`fuse` did. Names are qualified module names in the input model (``""`` is the model itself).

    fused: the convs that are now fused layers (under the same name in the returned model).
    folded_bn: the BatchNorm2d layers folded into them (eval mode; gone from the returned model).
    batch_norm: the BatchNorm2d layers that fused layers compute (training mode; a ``BatchNorm2dInFusedConv``
        in their place holds their state).
    residual: the convs fused with their BatchNorm2d (computed or folded), a residual add and the ReLU
        (``torch.fx``).
    skipped: ``(name, reason)`` for each ``nn.Conv2d`` left as it is.
    untraced: ``(name, error)`` for each module ``torch.fx`` could not trace (its children were fused instead).
    """

    fused: list[str] = field(default_factory=list)
    folded_bn: list[str] = field(default_factory=list)
    batch_norm: list[str] = field(default_factory=list)
    residual: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    untraced: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"cnnperf.fuse: {len(self.fused)} Conv2d+ReLU fused ({len(self.batch_norm)} with BatchNorm2d in "
                 f"training mode; {len(self.folded_bn)} with BatchNorm2d folded; {len(self.residual)} with a "
                 f"residual add), {len(self.skipped)} Conv2d left as they are"]
        lines += [f"  fused     {name}" for name in self.fused]
        lines += [f"  skipped   {name}: {reason}" for name, reason in self.skipped]
        lines += [f"  untraced  {name or '(model)'}: {error}" for name, error in self.untraced]
        return "\n".join(lines)


def fuse(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """``model`` with each ``Conv2d -> ReLU`` as one :class:`~cnnperf.nn.FusedConv2dBiasReLU` layer and each
    ``Conv2d -> BatchNorm2d -> ReLU`` as one fused layer.

    Only exact ``nn.Conv2d``, ``nn.BatchNorm2d`` and ``nn.ReLU`` layers are fused, and only when the conv's
    output goes to the ReLU alone (through the BatchNorm2d alone, if there is one; in a traced graph also
    through a BatchNorm2d and a residual add, the fused layer then called with the other addend). With ``model``
    in training
    mode a ``Conv2d -> BatchNorm2d -> ReLU`` becomes a :class:`~cnnperf.nn.FusedConv2dBatchNormReLU` (batch
    statistics, running statistics updated as BatchNorm2d does; it follows the BatchNorm's own mode later), the
    BatchNorm2d a :class:`~cnnperf.nn.BatchNorm2dInFusedConv` that keeps its state and keys. With ``model`` in
    eval mode the BatchNorm is folded into the conv's weight and bias (computed in float64, stored in the conv's
    dtype; a bias is created if the conv had none): a model for inference. Layers with hooks are not fused (the
    hooks would no longer see what they expect).

    Modules rewritten through ``torch.fx`` come back as ``GraphModule``: their Python control flow is fixed as
    it was when traced (branches on ``self.training`` included), so fuse a model in the mode it will run in.

    Hooks keep firing, with the same tensors: ``torch.fx`` never enters a module that has forward, forward-pre
    or backward hooks (it stays one call, fused inside on its own), and a module with hooks that is rewritten
    takes them along (the same hook dicts, so with ``inplace=True`` a handle's ``remove()`` still works; the
    default deep copy has copies of the hooks, which the user's handles do not reach). Such a hook then receives
    the GraphModule as its ``module`` argument. No hook is called while fusing.

    Args:
        model: the model; it is left unchanged unless ``inplace``.
        inplace: fuse ``model`` itself instead of a deep copy. Its submodules are replaced in place, so it
            computes what the returned model computes; when ``model`` itself is rewritten by ``torch.fx``, the
            returned GraphModule shares its layers and parameters instead. Always use the returned model.

    Returns:
        The fused model, with a :class:`FuseReport` as its attribute ``cnnperf_fuse_report``; the report is also
        logged at INFO level to the ``cnnperf.fuse`` logger. Its ``state_dict`` has the input's keys, less
        those of folded BatchNorms (fused layers keep the conv's keys; a folded one gains ``bias``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse: model must be a torch.nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    report = FuseReport()
    model = _fuse_module(model, "", fold=not model.training, report=report)
    setattr(model, REPORT_ATTRIBUTE, report)
    _log.info("%s", report)
    return model


# ---------------------------------------------------------------------------------------------------------
# The walk down the module tree.
# ---------------------------------------------------------------------------------------------------------

def _fuse_module(module: nn.Module, name: str, fold: bool, report: FuseReport) -> nn.Module:
    """``module`` fused: the same object changed in place, or the GraphModule that replaces it."""
    if not any(type(m) is nn.Conv2d for m in module.modules()):
        return module
    if type(module) is nn.Sequential:
        _fuse_sequential(module, name, fold, report)
        return module
    try:
        traced = _trace(module)
    except Exception as error:  # any failure to trace (TraceError, TypeError, ...) means: try the children
        report.untraced.append((name, f"{type(error).__name__}: {error}".splitlines()[0]))
        _fuse_children(module, name, fold, report)
        return module
    result = module
    if _fuse_graph(traced, name, fold, report):
        for attr in _HOOK_STATE:  # the module's own hooks go with its rewritten forward
            if hasattr(module, attr):
                setattr(traced, attr, getattr(module, attr))
        result = traced
    # Modules with hooks were single calls in the trace: fuse inside each on its own.
    for target in _hooked_calls(traced):
        sub = result.get_submodule(target)
        fused = _fuse_module(sub, _join(name, target), fold, report)
        if fused is not sub:
            result.set_submodule(target, fused)
    return result


def _has_hooks(m: nn.Module) -> bool:
    return any(getattr(m, hooks, None) for hooks in _HOOK_DICTS)


def _hooked_calls(gm: torch.fx.GraphModule) -> list[str]:
    """The modules with hooks and with children that ``gm``'s graph calls (the tracer did not enter them)."""
    targets = dict.fromkeys(node.target for node in gm.graph.nodes if node.op == "call_module")
    return [t for t in targets if _has_hooks(gm.get_submodule(t)) and len(gm.get_submodule(t)._modules) > 0]


def _fuse_children(module: nn.Module, name: str, fold: bool, report: FuseReport) -> None:
    """Fuse each child of a module that torch.fx cannot trace (so what follows its convs is unknown)."""
    for child_name, child in list(module.named_children()):
        qualified = _join(name, child_name)
        if type(child) is nn.Conv2d:
            report.skipped.append((qualified, "called by a module that torch.fx cannot trace"))
            continue
        fused = _fuse_module(child, qualified, fold, report)
        if fused is not child:
            setattr(module, child_name, fused)


class _Tracer(torch.fx.Tracer):
    """The default tracer, with fused layers as leaves (their forward checks shapes, which a Proxy cannot pass),
    and modules with hooks as leaves: tracing through one would call its hooks with Proxies, and the graph would
    then call its children without it, so its hooks would never fire again."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (isinstance(m, (FusedConv2dBiasReLU, FusedConv2dBatchNormReLU, BatchNorm2dInFusedConv))
                or _has_hooks(m)
                or super().is_leaf_module(m, module_qualified_name))


def _trace(module: nn.Module) -> torch.fx.GraphModule:
    tracer = _Tracer()
    graph = tracer.trace(module)
    gm = torch.fx.GraphModule(tracer.root, graph, type(module).__name__)
    # GraphModule copies only what the graph reads, under plain nn.Module parents: a ModuleList would become a
    # Module, and a parent's own buffers, or modules the forward never calls, would leave the state_dict. So its
    # children become the module's own tree again: containers as shallow copies with child and tensor dicts of
    # their own (fusing in them leaves ``module`` as it was), the layers themselves shared, as GraphModule does.
    gm._modules = {k: _containers_copied(m) for k, m in module._modules.items()}
    for k, p in module._parameters.items():
        gm._parameters.setdefault(k, p)
    for k, b in module._buffers.items():
        gm._buffers.setdefault(k, b)
    gm._non_persistent_buffers_set |= module._non_persistent_buffers_set
    return gm


def _containers_copied(m: nn.Module | None) -> nn.Module | None:
    """``m`` itself when it has no children, else a shallow copy with its own dicts of children (copied the same
    way), parameters and buffers."""
    if m is None or not m._modules:
        return m
    new = copy.copy(m)
    new._modules = {k: _containers_copied(c) for k, c in m._modules.items()}
    new._parameters = dict(m._parameters)
    new._buffers = dict(m._buffers)
    new._non_persistent_buffers_set = set(m._non_persistent_buffers_set)
    return new


# ---------------------------------------------------------------------------------------------------------
# The two pattern finders. Each hands (conv, BatchNorm2d or None, ReLU module or None) to _fused_layer.
# ---------------------------------------------------------------------------------------------------------

def _fuse_sequential(seq: nn.Sequential, name: str, fold: bool, report: FuseReport) -> None:
    """Fuse consecutive children of ``seq``, and fuse inside the other children, in order."""
    children = list(seq.named_children())
    layers = [m for _, m in children] + [None]  # None: the end of the Sequential
    for i, (child_name, layer) in enumerate(children):
        qualified = _join(name, child_name)
        if type(layer) is not nn.Conv2d:
            if seq[i] is layer:  # not a ReLU or BatchNorm2d already replaced by Identity
                seq[i] = _fuse_module(layer, qualified, fold, report)
            continue
        if isinstance(layers[i + 1], nn.SyncBatchNorm):
            report.skipped.append((qualified, _sync_batch_norm(_join(name, children[i + 1][0]))))
            continue
        bn = layers[i + 1] if type(layers[i + 1]) is nn.BatchNorm2d else None
        relu = layers[i + 2] if bn is not None else layers[i + 1]
        if type(relu) is not nn.ReLU:
            report.skipped.append((qualified, f"followed by {_chain(bn, _layer_name(relu))}, not a ReLU"))
            continue
        bn_name = _join(name, children[i + 1][0]) if bn is not None else None
        fused = _fused_layer(qualified, layer, bn_name, bn, relu, fold, report)
        if fused is None:
            continue
        seq[i] = fused
        for j in range(i + 1, i + (3 if bn is not None else 2)):
            seq[j] = nn.Identity()
        if isinstance(fused, FusedConv2dBatchNormReLU):
            seq[i + 1] = fused.bn  # the BatchNorm's state, under its own index


def _fuse_graph(gm: torch.fx.GraphModule, name: str, fold: bool, report: FuseReport) -> bool:
    """Fuse in ``gm``'s graph; whether anything was fused. Fused layers are installed in ``gm`` only."""
    modules = dict(gm.named_modules())
    calls = Counter(node.target for node in gm.graph.nodes if node.op == "call_module")
    read_directly = {node.target.rpartition(".")[0] for node in gm.graph.nodes if node.op == "get_attr"}
    seen = set()
    kept = set()  # targets of BatchNorm2dInFusedConv: not called by the graph, but their state stays there
    removed = []  # targets of modules whose calls left the graph (ReLUs, folded BatchNorms)
    fused_calls = {}  # the call of each layer fused with a residual add -> its name
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or type(modules[node.target]) is not nn.Conv2d or node.target in seen:
            continue
        seen.add(node.target)
        qualified = _join(name, node.target)
        if calls[node.target] > 1:
            # One module, several call sites: replacing it would change all of them.
            report.skipped.append((qualified, f"called {calls[node.target]} times in forward"))
            continue
        if node.target in read_directly:
            report.skipped.append((qualified, "its parameters are also read directly in forward"))
            continue
        found = _graph_chain(node, modules, fused_calls)
        if isinstance(found, str):
            report.skipped.append((qualified, found))
            continue
        bn_node, relu_node, add_node, other = found
        if add_node is not None:
            mutation = _mutation_between(node, relu_node, modules)
            if mutation is not None:
                # The fused layer runs where the ReLU was: a tensor changed in place in between could be its input.
                report.skipped.append((qualified, f"followed by BatchNorm2d and a residual add, with {mutation} "
                                                  f"in place in between"))
                continue
        if bn_node is not None and not fold and calls[bn_node.target] > 1:
            # Its place would hold the fused layer's BatchNorm2dInFusedConv, an identity, at every call site.
            report.skipped.append((qualified, f"followed by BatchNorm2d {_join(name, bn_node.target)}, which is "
                                              f"called {calls[bn_node.target]} times in forward"))
            continue
        bn = modules[bn_node.target] if bn_node is not None else None
        relu = modules[relu_node.target] if relu_node.op == "call_module" else None
        bn_name = _join(name, bn_node.target) if bn_node is not None else None
        fused = _fused_layer(qualified, modules[node.target], bn_name, bn, relu, fold, report)
        if fused is None:
            continue
        # gm's containers are its own (GraphModule builds them), so the traced module is not touched.
        gm.set_submodule(node.target, fused)
        if isinstance(fused, FusedConv2dBatchNormReLU):
            gm.set_submodule(bn_node.target, fused.bn)
            kept.add(bn_node.target)
        elif bn_node is not None:
            removed.append(bn_node.target)
        if relu_node.op == "call_module":
            removed.append(relu_node.target)
        call = node
        if add_node is not None:
            # fused(x, residual=other) where the ReLU was: the other addend (a downsampled identity) may be
            # computed after the conv.
            with gm.graph.inserting_before(relu_node):
                call = gm.graph.call_module(node.target, node.args, {**node.kwargs, "residual": other})
            fused_calls[call] = qualified
            report.residual.append(qualified)
        relu_node.replace_all_uses_with(call)
        gm.graph.erase_node(relu_node)
        if add_node is not None:
            gm.graph.erase_node(add_node)
        if bn_node is not None:
            gm.graph.erase_node(bn_node)
        if add_node is not None:
            gm.graph.erase_node(node)
        changed = True
    if changed:
        gm.graph.lint()
        # Only the modules whose calls left the graph go (folded BatchNorms, with their state_dict keys; ReLUs no
        # longer called), not every module the graph does not call: that would take the parents of the kept
        # BatchNorm2dInFusedConv (and anything they hold) and modules the forward never used.
        used = {prefix for n in gm.graph.nodes if n.op in ("call_module", "get_attr")
                for prefix in _prefixes(n.target)}
        for target in dict.fromkeys(removed):
            if target not in used and target not in kept:
                gm.delete_submodule(target)
        gm.recompile()
    return changed


def _prefixes(target: str) -> list[str]:
    """``a.b.c`` -> ``a``, ``a.b``, ``a.b.c``."""
    parts = target.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift,
                      operator.irshift, operator.imatmul}


def _mutation_between(first: torch.fx.Node, last: torch.fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """The name of an op strictly between ``first`` and ``last`` (graph order) that changes a tensor in place, or
    None: ``x.add_(...)``, ``x += ...``, ``inplace=True``, a module with ``inplace=True``."""
    node = first.next
    while node is not last and node.op != "output":
        target = node.target
        name = target if isinstance(target, str) else getattr(target, "__name__", "")
        if (target in _INPLACE_OPERATORS or node.kwargs.get("inplace") is True
                or (node.op == "call_module" and getattr(modules.get(target), "inplace", False) is True)
                or (node.op in ("call_method", "call_function") and name.endswith("_") and not name.endswith("__"))):
            return node.op == "call_module" and type(modules[target]).__name__ or name
        node = node.next
    return None


def _graph_chain(conv_node: torch.fx.Node, modules: dict[str, nn.Module], fused_calls: dict[torch.fx.Node, str]):
    """``(bn_node or None, relu_node, add_node or None, other addend or None)`` when the conv's output goes to a
    ReLU alone (through a BatchNorm2d alone, or through a BatchNorm2d and an add of one other tensor), else the
    reason it does not. ``fused_calls``: the calls of layers fused with a residual so far."""
    user = _sole_user(conv_node)
    if user is None:
        return f"its output has {len(conv_node.users)} users; only a ReLU as the one user can be fused"
    bn_node = None
    if user.op == "call_module" and isinstance(modules[user.target], nn.SyncBatchNorm):
        return _sync_batch_norm(user.target)
    if user.op == "call_module" and type(modules[user.target]) is nn.BatchNorm2d:
        bn_node, user = user, _sole_user(user)
        if user is None:
            return f"followed by BatchNorm2d, whose output has {len(bn_node.users)} users"
        if user in fused_calls:
            return f"followed by BatchNorm2d, whose output is the residual that fused {fused_calls[user]} adds"
        other = _other_addend(user, bn_node)
        if other is not None and _sole_user(user) is not None \
                and _is_relu_node(_sole_user(user), user, modules):
            return bn_node, _sole_user(user), user, other
    if not _is_relu_node(user, conv_node if bn_node is None else bn_node, modules):
        bn = modules[bn_node.target] if bn_node is not None else None
        return f"followed by {_chain(bn, _node_name(user, modules))}, not a ReLU"
    return bn_node, user, None, None


def _other_addend(node: torch.fx.Node, addend: torch.fx.Node) -> torch.fx.Node | None:
    """The other tensor of ``node`` when it is ``addend + other`` (or ``other + addend``; in place only as
    ``addend += other``, which changes nothing else; with no alpha), else None."""
    is_add = ((node.op == "call_function" and node.target in _ADD_FUNCTIONS)
              or (node.op == "call_method" and node.target in _ADD_METHODS))
    if not is_add or node.kwargs or len(node.args) != 2 or addend not in node.args:
        return None
    if (node.target is operator.iadd or node.target == "add_") and node.args[0] is not addend:
        return None  # other += addend changes other, which something else may read
    other = node.args[1] if node.args[0] is addend else node.args[0]
    return other if isinstance(other, torch.fx.Node) and other is not addend else None


def _sole_user(node: torch.fx.Node) -> torch.fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _is_relu_node(node: torch.fx.Node, producer: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` is a ReLU of ``producer``'s output (and of nothing else)."""
    if node.all_input_nodes != [producer]:
        return False
    if node.op == "call_module":
        return type(modules[node.target]) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in _RELU_METHODS


# ---------------------------------------------------------------------------------------------------------
# One pattern: the fused layer, or None with the reason in the report.
# ---------------------------------------------------------------------------------------------------------

def _fused_layer(name: str, conv: nn.Conv2d, bn_name: str | None, bn: nn.BatchNorm2d | None,
                 relu: nn.ReLU | None, fold: bool, report: FuseReport) -> nn.Conv2d | None:
    """The fused layer for ``conv [-> bn] -> relu`` (``relu`` None: a functional ReLU), or None if not fusable:
    a ``FusedConv2dBiasReLU`` (no BatchNorm, or one folded in eval mode) or a ``FusedConv2dBatchNormReLU``
    (training mode) whose ``bn`` is the ``BatchNorm2dInFusedConv`` to put in the BatchNorm's place."""
    if any(getattr(m, hooks) for m in (conv, bn, relu) if m is not None for hooks in _HOOK_DICTS):
        report.skipped.append((name, "it or a layer after it has hooks, which the fused layer would bypass"))
        return None
    if bn is None:
        fused = FusedConv2dBiasReLU.from_conv(conv)
    elif not fold:
        fused = FusedConv2dBatchNormReLU.from_modules(conv, BatchNorm2dInFusedConv.from_batch_norm(bn))
        report.batch_norm.append(bn_name)
    else:
        reason = _why_not_foldable(bn, fold)
        if reason is not None:
            report.skipped.append((name, f"followed by BatchNorm2d {bn_name}: {reason}"))
            return None
        fused = _fold_batchnorm(conv, bn)
        report.folded_bn.append(bn_name)
    report.fused.append(name)
    return fused


def _sync_batch_norm(name: str) -> str:
    return (f"followed by SyncBatchNorm {name}, whose statistics are reduced over all processes: the fused layer "
            f"would normalise with each process's own")


def _why_not_foldable(bn: nn.BatchNorm2d, fold: bool) -> str | None:
    if bn.training:
        return "it is in training mode although the model is in eval mode"
    if not bn.track_running_stats or bn.running_mean is None:
        return "track_running_stats=False, so it normalises with batch statistics even in eval mode"
    return None


def _fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> FusedConv2dBiasReLU:
    """``relu(bn(conv(x)))`` of an eval-mode ``bn`` as one fused layer with new parameters (``conv`` unchanged).

    weight' = weight * s, bias' = (bias - running_mean) * s + beta, with s = gamma / sqrt(running_var + eps);
    computed in float64 and stored in the conv weight's dtype, on its device.
    """
    weight = conv.weight.detach()

    def here(t: torch.Tensor | None) -> torch.Tensor | None:  # None: no conv bias, or BatchNorm affine=False
        return None if t is None else t.detach().to(weight.device)

    new_weight, new_bias = reference.fold_batch_norm(weight, here(conv.bias), here(bn.running_mean),
                                                     here(bn.running_var), here(bn.weight), here(bn.bias), bn.eps,
                                                     torch.float64)

    fused = FusedConv2dBiasReLU.from_conv(conv)
    requires_grad = conv.weight.requires_grad
    fused.weight = nn.Parameter(new_weight.to(weight.dtype), requires_grad=requires_grad)
    fused.bias = nn.Parameter(new_bias.to(weight.dtype), requires_grad=requires_grad)
    return fused


# ---------------------------------------------------------------------------------------------------------
# Names for the report.
# ---------------------------------------------------------------------------------------------------------

def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _chain(bn: nn.BatchNorm2d | None, after: str) -> str:
    return f"BatchNorm2d and {after}" if bn is not None else after


def _layer_name(layer: nn.Module | None) -> str:
    return type(layer).__name__ if layer is not None else "the end of the Sequential"


def _node_name(node: torch.fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return type(modules[node.target]).__name__
    if node.op == "output":
        return "the module's output"
    return getattr(node.target, "__name__", str(node.target))
