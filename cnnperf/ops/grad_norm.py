"""Gradient norms and clipping over all parameters: argument checks, the device table, the launchers.

One path::

    cnnperf.clip_grad_norm_ / cnnperf.grad_norms (here)
      -> per-tensor sum |g|^p of the local gradients: Triton (kernels/grad_norm.py, one launch over all tensors)
         or cnnperf.reference.grad_norm_accumulate, per cnnperf.backend
      -> all-reduce of that vector when the gradients are shards (FSDP2 DTensors or ``process_group=``)
      -> per-tensor norms, total, finite flag, clip coefficient (one program, or the reference)
      -> clip: every gradient times the coefficient, read from device memory (no host synchronisation)

A gradient clip is a function, not an autograd node: it acts on ``.grad`` after backward.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import math
import operator
import types
import warnings
from typing import Iterable, NamedTuple

import torch
import torch.distributed as dist

from cnnperf import backend, reference

OP = "clip_grad_norm_"
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


class GradNorms(NamedTuple):
    """What :func:`grad_norms` returns; every field is a tensor on the gradients' device."""

    total: torch.Tensor  # 0-dim: the norm of all gradients together
    per_param: torch.Tensor  # 1-D: the norm of each gradient, in parameter order (parameters without .grad left out)
    finite: torch.Tensor  # 0-dim bool: whether ``total`` is finite


def grad_norms(parameters, norm_type: float = 2.0, *, process_group=None) -> GradNorms:
    """Total norm, per-parameter norms and a finite flag of the gradients, computed in one pass.

    ``parameters``: a tensor or an iterable of tensors; those without ``.grad`` are skipped.
    ``norm_type``: any order ``torch.linalg.vector_norm`` takes, as in torch (0 counts non-zeros, negative
    orders and ``-inf`` too); 2 and ``inf`` run the fused kernels, the others the reference ops.
    ``process_group``: the gradients are shards of the full gradients across this group (DTensor gradients
    from FSDP2 are recognised without it); their norms are all-reduced so every rank gets the global ones.
    Norms are fp32 (fp64 if any gradient is), plain tensors also for DTensor gradients. No host synchronisation.
    Nothing is recorded by autograd, as with torch's clip.
    """
    with torch.no_grad():
        params = _param_list(parameters)
        norm_type = _check_norm_type(norm_type)
        plan = _cached_plan(params, norm_type, process_group)
        grads = plan.grads if plan is not None else _grads(params)
        if not grads:
            zero = torch.zeros(())
            return GradNorms(zero, torch.zeros(0), torch.tensor(True))
        norms, total, finite, _, _ = _norms(grads, norm_type, max_norm=1.0, scale=None,
                                            process_group=process_group, params=params, plan=plan)
        return GradNorms(total, norms, finite)


def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                    foreach: bool | None = None, *, scaler=None, process_group=None, optimizer=None) -> torch.Tensor:
    """Drop-in for :func:`torch.nn.utils.clip_grad_norm_`: scale all gradients so their total norm is at most
    ``max_norm``, and return the total norm (0-dim, on the gradients' device, in their dtype).

    Same arguments and semantics as torch's (``foreach`` is accepted and only used on the reference path): any
    ``norm_type`` torch takes; a warning for an empty generator; nothing recorded by autograd (gradients made
    with ``create_graph=True`` are scaled in place, outside the graph); with FSDP2 (DTensor gradients) the
    total is a DTensor replicated on their mesh. No host synchronisation, except with
    ``error_if_nonfinite=True``, which must look at the norm.

    ``scaler``: a :class:`torch.amp.GradScaler` whose scale the gradients still carry (``scaler.unscale_``
    not called): the gradients are clipped against ``max_norm * scale`` in the same pass, the returned norm is
    the unscaled one, and ``scaler.step`` still skips the step on inf/NaN. ``process_group``: see
    :func:`grad_norms`.

    ``optimizer``: a fused optimizer (``fused=True``: SGD, Adam, AdamW, Adagrad) whose next ``step()`` (or
    ``scaler.step(optimizer)``) applies the clip as it reads the gradients: here they are only read (for the
    norm), not scaled. The coefficient goes to the optimizer as its ``grad_scale``, the device-side divisor
    ``GradScaler`` gives fused optimizers (with a ``scaler`` the two multiply, and inf/NaN still skip the step
    and back the scale off). torch's fused kernels write the divided gradients back whenever ``grad_scale`` is
    set, so after the step ``.grad`` holds the clipped values, as after an in-place clip; between this call and
    the step it holds the unclipped ones. Gradient traffic over the bare fused step: one read and one write,
    where clipping in place costs three passes. It applies to every parameter of ``optimizer``: pass the same
    parameters.
    """
    with torch.no_grad():
        return _clip_grad_norm(parameters, max_norm, norm_type, error_if_nonfinite, foreach, scaler, process_group,
                               optimizer)


def _clip_grad_norm(parameters, max_norm, norm_type, error_if_nonfinite, foreach, scaler, process_group,
                    optimizer=None):
    if optimizer is not None and not getattr(optimizer, "_step_supports_amp_scaling", False):
        raise ValueError(f"{OP}: optimizer= applies the clip in the optimizer's step through its grad_scale, which "
                         f"only fused optimizers read; {type(optimizer).__name__} was not built with fused=True "
                         "(or clip without optimizer=, scaling the gradients in place)")
    if isinstance(parameters, types.GeneratorType):
        parameters = list(parameters)
        if not parameters:
            # torch's own words and category, pointing at the caller of clip_grad_norm_
            warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.", stacklevel=3)
    params = _param_list(parameters)
    norm_type = _check_norm_type(norm_type)
    plan = _cached_plan(params, norm_type, process_group)
    grads = plan.grads if plan is not None else _grads(params)
    max_norm = float(max_norm)
    if not grads:
        return torch.tensor(0.0)
    # GradScaler keeps its scale as a device tensor in _scale (get_scale() would copy it to the host: a sync);
    # None until the first scaler.scale(loss), when the gradients carry no scale yet.
    scale = scaler._scale if scaler is not None and scaler.is_enabled() else None
    if scale is not None and scale.device != grads[0].device:
        raise ValueError(f"{OP}: scaler's scale is on {scale.device}, the gradients on {grads[0].device}")
    result_dtype = plan.result_dtype if plan is not None else _result_dtype(grads)
    _, total, finite, coef, apply = _norms(grads, norm_type, max_norm, scale, process_group, foreach,
                                           round_to=result_dtype if result_dtype.itemsize == 2 else None,
                                           params=params, plan=plan)
    if error_if_nonfinite and not bool(finite):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it cannot be "
            "clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
            "`error_if_nonfinite=False`")
    if optimizer is None:
        apply(coef)
    else:
        _clip_in_step(optimizer, coef, scale is not None)
    return _as_grads_total(total.to(result_dtype), grads)


def _clip_in_step(optimizer, coef: torch.Tensor, scaler_steps: bool) -> None:
    """Leave ``coef`` for the fused ``optimizer``'s next step: it divides the gradients by ``grad_scale``.

    ``scaler_steps``: ``GradScaler.step`` will run it, multiplying its own scale into ``grad_scale`` (torch takes
    a user's ``grad_scale`` so), setting ``found_inf`` and deleting both after the step. Otherwise the step is
    the user's ``optimizer.step()``: ``found_inf`` is 0 (nothing is skipped, as after an in-place clip: a NaN
    coefficient makes NaN parameters in both) and a one-shot step post-hook deletes both after it, so a later
    step does not clip again."""
    optimizer.grad_scale = coef.reciprocal().to(torch.float32)  # (the CPU's coefficient is float64)
    if scaler_steps:
        return
    optimizer.found_inf = torch.zeros((), device=coef.device, dtype=torch.float32)
    if getattr(optimizer, "_cnnperf_clip_hook", None) is not None:
        return  # a second clip before the step: its coefficient replaces the first, the hook is there

    def after_step(opt, args, kwargs):
        for name in ("grad_scale", "found_inf", "_cnnperf_clip_hook"):
            if hasattr(opt, name):
                delattr(opt, name)
        handle.remove()

    handle = optimizer.register_step_post_hook(after_step)
    optimizer._cnnperf_clip_hook = handle


# ---------------------------------------------------------------------------------------------------------

def _param_list(parameters) -> list | tuple:
    """``parameters`` as a list or tuple (a tensor, or any iterable of them, as torch's clip takes)."""
    if isinstance(parameters, torch.Tensor):
        return [parameters]
    if isinstance(parameters, (list, tuple)):
        return parameters
    if not isinstance(parameters, Iterable):
        raise TypeError(f"{OP}: parameters must be a tensor or an iterable of tensors, got {type(parameters).__name__}")
    return list(parameters)


def _grads(parameters: list | tuple) -> list[torch.Tensor]:
    grads = []
    for i, p in enumerate(parameters):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{OP}: parameters[{i}] must be a tensor, got {type(p).__name__}")
        if p.grad is not None:
            grads.append(p.grad)
    for i, g in enumerate(grads):
        if not g.is_floating_point():
            raise TypeError(f"{OP}: gradient {i} has dtype {g.dtype} (shape {tuple(g.shape)}); "
                            "norms need floating-point gradients")
    return grads


def _check_norm_type(norm_type) -> float:
    return float(norm_type)  # as torch: 'inf' and 2 are orders too; what float() refuses, it refuses alike


def _check_empty(grads, norm_type: float) -> None:
    """torch.linalg.vector_norm refuses the orders without an identity (inf, negative) on an empty tensor; so
    does torch's clip, and so does this one (the sizes are on the host: no synchronisation). ``grads`` are the
    whole gradients (a DTensor's size is the global one): an empty local shard of a non-empty gradient is no
    error, its partial is the reduce's identity (the other ranks must not wait for a rank that raised)."""
    if norm_type == math.inf or norm_type < 0:
        for i, g in enumerate(grads):
            if g.numel() == 0:
                raise RuntimeError(f"{OP}: cannot compute the {norm_type:g} norm of gradient {i} (shape "
                                   f"{tuple(g.shape)}): it is empty, and that norm has no identity")


def _as_grads_total(total: torch.Tensor, grads) -> torch.Tensor:
    """The total norm as torch's clip returns it: for DTensor gradients (FSDP2) a DTensor replicated on their
    mesh (callers use ``.full_tensor()``), else the plain tensor."""
    if not grads or not _is_dtensor(grads[0]):
        return total
    from torch.distributed.tensor import DTensor, Replicate

    mesh = grads[0].device_mesh
    return DTensor.from_local(total, mesh, [Replicate()] * mesh.ndim, run_check=False)


def _result_dtype(grads) -> torch.dtype:
    dtype = grads[0].dtype
    for g in grads[1:]:
        dtype = torch.promote_types(dtype, g.dtype)
    return dtype


def _local(g: torch.Tensor) -> torch.Tensor:
    return g.to_local() if _is_dtensor(g) else g


def _is_dtensor(g) -> bool:
    return type(g).__name__ == "DTensor" and hasattr(g, "to_local")


def _reduce_groups(grads, process_group) -> list:
    """The process groups over which the per-tensor sums are all-reduced (none for replicated gradients)."""
    if process_group is not None:
        if any(_is_dtensor(g) for g in grads):
            raise ValueError(f"{OP}: pass process_group= only for plain-tensor shards; DTensor gradients "
                             "carry their own mesh")
        return [process_group]
    dtensors = [g for g in grads if _is_dtensor(g)]
    if not dtensors:
        return []
    if len(dtensors) != len(grads):
        raise ValueError(f"{OP}: {len(dtensors)} of {len(grads)} gradients are DTensors; mixing DTensor and "
                         "plain gradients would count the plain ones once per rank")
    mesh, placements = dtensors[0].device_mesh, dtensors[0].placements
    groups = []
    for dim, placement in enumerate(placements):
        if placement.is_partial():
            raise ValueError(f"{OP}: gradient has a Partial placement; reduce it before taking norms")
        if placement.is_shard():
            groups.append(mesh.get_group(dim))
    for g in dtensors[1:]:
        if g.device_mesh != mesh or [p.is_shard() for p in g.placements] != [p.is_shard() for p in placements]:
            raise ValueError(f"{OP}: all DTensor gradients must share one mesh and sharded mesh dimensions")
    return groups


def _norms(grads, norm_type, max_norm, scale, process_group, foreach=None, round_to=None, params=None,
           plan=None):
    """(per-tensor norms, total, finite, coefficient, apply) where ``apply(coef)`` clips the gradients.

    ``round_to``: the 16-bit dtype the total norm is returned in; it is rounded to it before the finite flag and
    the coefficient are taken from it, as torch's clip does (whose total *is* in that dtype): a total that
    overflows float16 is inf, zeroes the gradients and fails ``error_if_nonfinite``, as in torch.
    Per-tensor norms and the total are float32 (float64 if any gradient is).
    ``plan``: :func:`_cached_plan`'s, whose checks and device table hold for ``grads``; else ``params`` (the
    parameters ``grads`` came from) lets a Triton call leave one for the next.
    """
    if plan is not None and backend.choose(OP, plan.table.addr.device.type, None) == "triton":
        acc = _triton_accumulate(plan.table, norm_type)
        norms, total, finite, coef = _triton_finalize(acc, norm_type, max_norm, scale, round_to)
        return norms, total, finite, coef, lambda c: _triton_scale(plan.table, c)
    if process_group is None:  # with plain shards the whole gradient's size is not known here
        _check_empty(grads, norm_type)
    local = [_local(g) for g in grads]
    groups = _reduce_groups(grads, process_group)
    device = local[0].device
    if any(g.device != device for g in local):
        raise ValueError(f"{OP}: gradients on several devices ({sorted({str(g.device) for g in local})}); "
                         "clip each device's parameters separately")
    path = backend.choose(OP, device.type, _unsupported(local, norm_type))
    if path == "triton":
        table = _table(local)
        if (params is not None and not groups and process_group is None
                and all(map(operator.is_, local, grads))):  # plain tensors (not DTensors' local shards)
            _remember(params, grads, table)
        acc = _triton_accumulate(table, norm_type)
    else:
        acc = reference.grad_norm_accumulate(local, norm_type)
    for group in groups:
        dist.all_reduce(acc, op=reference.grad_norm_reduce_op(norm_type), group=group)
    if path == "triton":
        norms, total, finite, coef = _triton_finalize(acc, norm_type, max_norm, scale, round_to)
        return norms, total, finite, coef, lambda c: _triton_scale(table, c)
    norms, total, finite, coef = reference.grad_norm_finalize(acc, norm_type, max_norm, scale, round_to)
    public = torch.float64 if any(g.dtype == torch.float64 for g in local) else torch.float32
    norms, total = norms.to(public), total.to(public)

    def apply(c):
        for same_dtype in _by_dtype(local).values():
            c_dtype = c.to(same_dtype[0].dtype)  # as torch: the coefficient in the gradient's dtype
            if foreach is False:
                for g in same_dtype:
                    g.mul_(c_dtype)
            else:
                torch._foreach_mul_(same_dtype, c_dtype)

    return norms, total, finite, coef, apply


def _by_dtype(grads) -> dict:
    groups = collections.defaultdict(list)
    for g in grads:
        groups[g.dtype].append(g)
    return groups


def _unsupported(grads, norm_type) -> str | None:
    if norm_type not in (2.0, math.inf):
        return f"norm_type={norm_type} is not covered by the Triton kernels (2 and inf are)"
    for i, g in enumerate(grads):
        if g.dtype not in _DTYPE_CODES:
            return f"gradient {i} has dtype {g.dtype}, not covered by the Triton kernels (float32, float16, bfloat16)"
        if g.is_sparse or not _dense(g):
            return f"gradient {i} (shape {tuple(g.shape)}, stride {g.stride()}) is not dense in memory"
    return None


def _dense(g: torch.Tensor) -> bool:
    """Whether ``g``'s elements fill ``numel`` consecutive slots from ``data_ptr`` (contiguous in some order)."""
    if g.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(g.stride(), g.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


# ---------------------------------------------------------------------------------------------------------
# The device table (kernels/grad_norm.py describes its layout), cached per list of gradients.
# ---------------------------------------------------------------------------------------------------------

class _Table(NamedTuple):
    addr: torch.Tensor
    numel: torch.Tensor
    meta: torch.Tensor
    chunk_tensor: torch.Tensor
    chunk_start: torch.Tensor
    chunk_begin: torch.Tensor
    tensors: int
    chunks: int
    chunk: int
    host: torch.Tensor  # the pinned host copy, kept alive while the copy to the device may be in flight


_TABLES: collections.OrderedDict = collections.OrderedDict()
_TABLES_KEPT = 8


@functools.cache
def _kernels():
    from cnnperf.kernels import grad_norm as K
    return K


def _config() -> dict:
    return _interpreter_config() if backend.interpret() else _gpu_config()


@functools.cache
def _interpreter_config() -> dict:
    return dict(_kernels().INTERPRET_CONFIG, num_warps=1)


@functools.cache
def _gpu_config() -> dict:
    K = _kernels()
    return {"CHUNK": K.CHUNK, "BLOCK": K.BLOCK, "REDUCE_BLOCK_C": K.REDUCE_BLOCK_C, "num_warps": K.NUM_WARPS}


def _table(grads) -> _Table:
    """The device table of ``grads``: built once per list of gradient storages, then reused from a cache."""
    chunk = _config()["CHUNK"]
    key = (chunk, grads[0].device) + tuple((g.data_ptr(), g.numel(), g.dtype) for g in grads)
    table = _TABLES.get(key)
    if table is not None:
        _TABLES.move_to_end(key)
        return table
    counts = [max(1, -(-g.numel() // chunk)) for g in grads]
    begin = [0]
    for c in counts:
        begin.append(begin[-1] + c)
    chunk_tensor = [t for t, c in enumerate(counts) for _ in range(c)]
    chunk_start = [j * chunk for c in counts for j in range(c)]
    meta = [_DTYPE_CODES[g.dtype] | (int(g.data_ptr() % 16 == 0) << 2) for g in grads]
    flat = ([g.data_ptr() for g in grads] + [g.numel() for g in grads] + meta + chunk_tensor + chunk_start + begin)
    host = torch.tensor(flat, dtype=torch.int64)
    device = grads[0].device
    if device.type == "cuda":
        host = host.pin_memory()
    dev = host.to(device, non_blocking=True)
    n, c = len(grads), len(chunk_tensor)
    parts = torch.split(dev, [n, n, n, c, c, n + 1])
    table = _Table(*parts, tensors=n, chunks=c, chunk=chunk, host=host)
    _TABLES[key] = table
    if len(_TABLES) > _TABLES_KEPT:
        _TABLES.popitem(last=False)
    return table


# ---------------------------------------------------------------------------------------------------------
# The per-call plan: what a list of parameters needs on the Triton path, checked once (host time per call).
# ---------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Plan:
    """A list of parameters whose gradients the Triton path took: the checks passed (dtypes, density, one device,
    plain tensors, no process group) and the device table. Valid while the same parameters have the same
    gradients, or gradients at the same addresses (``zero_grad(set_to_none=True)`` frees them; the next backward's
    land where they were, as the caching allocator hands the same blocks back in the same order)."""

    params: list  # the parameters, in order, every one with a gradient
    grads: list  # their gradients when last seen
    ptrs: list  # the gradients' addresses (the table's)
    table: _Table
    result_dtype: torch.dtype
    has_empty: bool  # an empty gradient: inf / negative orders raise on it (the slow path says so)


_PLANS: collections.OrderedDict = collections.OrderedDict()
_GRAD = operator.attrgetter("grad")


def _plan_key(params) -> tuple:
    return len(params), id(params[0])


def _remember(params, grads, table: _Table) -> None:
    key = _plan_key(params)
    _PLANS[key] = _Plan(list(params), list(grads), [g.data_ptr() for g in grads], table, _result_dtype(grads),
                        any(g.numel() == 0 for g in grads))
    _PLANS.move_to_end(key)
    if len(_PLANS) > _TABLES_KEPT:
        _PLANS.popitem(last=False)


def _cached_plan(params, norm_type: float, process_group) -> _Plan | None:
    """The plan of ``params`` if it holds for their gradients now, else None (then the full checks run).

    Only C-level passes over the tensors, no Python loop (the host time of a call is the point): the
    gradients are the plan's tensors at the plan's addresses (a tensor's dtype never changes; its storage may
    move, by ``.data =`` or ``set_``), or, after ``zero_grad(set_to_none=True)``, new dense tensors at the
    plan's addresses of the plan's own parameters (torch refuses a ``.grad`` of another dtype or shape than its
    parameter's, so sizes and dtypes hold).
    """
    if not params or process_group is not None or norm_type not in (2.0, math.inf):
        return None
    plan = _PLANS.get(_plan_key(params))
    if (plan is None or len(plan.params) != len(params) or (norm_type == math.inf and plan.has_empty)
            or plan.table.chunk != _config()["CHUNK"]):  # (the interpreter's chunks are smaller)
        return None
    grads = list(map(_GRAD, params))
    same = all(map(operator.is_, grads, plan.grads))
    if not same and (not all(map(operator.is_, params, plan.params))
                     or not all(map(operator.is_not, grads, itertools.repeat(None)))):
        return None
    if list(map(torch.Tensor.data_ptr, grads)) != plan.ptrs:
        return None
    if not same:
        if not (all(map(torch.Tensor.is_contiguous, grads)) or all(map(_dense, grads))):
            return None
        plan.grads = grads
    return plan


def _triton_accumulate(table: _Table, norm_type: float) -> torch.Tensor:
    K, cfg = _kernels(), _config()
    norm_inf = norm_type == math.inf
    device = table.addr.device
    partial = torch.empty(table.chunks, device=device, dtype=torch.float32)
    with backend.quiet_interpreter():
        K._grad_norm_partial_kernel[(table.chunks,)](
            table.addr, table.numel, table.meta, table.chunk_tensor, table.chunk_start, partial,
            NORM_INF=norm_inf, CHUNK=cfg["CHUNK"], BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"])
    acc = torch.empty(table.tensors, device=device, dtype=torch.float32)
    with backend.quiet_interpreter():
        K._grad_norm_reduce_kernel[(table.tensors,)](
            partial, table.chunk_begin, acc, NORM_INF=norm_inf, BLOCK_C=cfg["REDUCE_BLOCK_C"])
    return acc


_ROUND_CODES = {None: 0, torch.float16: 1, torch.bfloat16: 2}


def _triton_finalize(acc: torch.Tensor, norm_type: float, max_norm: float, scale, round_to=None):
    K = _kernels()
    out = torch.empty(acc.numel() + 2, device=acc.device, dtype=torch.float32)
    norms, total, coef = out[:-2], out[-2], out[-1:]
    finite = torch.empty((), device=acc.device, dtype=torch.bool)
    with backend.quiet_interpreter():
        K._grad_norm_finalize_kernel[(1,)](
            acc, norms, total, finite, coef, scale if scale is not None else acc, acc.numel(), max_norm,
            NORM_INF=norm_type == math.inf, HAS_SCALE=scale is not None, ROUND_TOTAL=_ROUND_CODES[round_to],
            BLOCK_T=K.FINALIZE_BLOCK_T)
    return norms, total, finite, coef.view(())


def _triton_scale(table: _Table, coef: torch.Tensor) -> None:
    K, cfg = _kernels(), _config()
    with backend.quiet_interpreter():
        K._grad_scale_kernel[(table.chunks,)](
            table.addr, table.numel, table.meta, table.chunk_tensor, table.chunk_start, coef,
            CHUNK=cfg["CHUNK"], BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"])
