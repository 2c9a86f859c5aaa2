"""Triton kernels of the fused gradient norm and clip, over many tensors in one launch each.

The tensors are described by a device table built once per list of gradients (cnnperf/ops/grad_norm.py):

- per tensor ``t``: ``addr[t]`` its first element's address, ``numel[t]``, ``meta[t] = dtype_code | aligned << 2``
  (dtype_code 0 fp32, 1 fp16, 2 bf16; aligned: the address is a multiple of 16 bytes);
- per chunk ``c`` (a tensor is cut into chunks of ``CHUNK`` elements, one program each): ``chunk_tensor[c]`` and
  ``chunk_start[c]`` (element offset); the chunks of tensor ``t`` are ``chunk_begin[t] .. chunk_begin[t+1]-1``.

Passes, all on the device, without a host synchronisation:

1. ``_grad_norm_partial_kernel``: per chunk, the sum of squares (``NORM_INF``: the max of |x|) in fp32.
2. ``_grad_norm_reduce_kernel``: per tensor (one program each), the sum (max) of its chunks' partials, a block
   of chunks at a time reduced as a tree (``tl.sum``): VGG-16's fc6 has 1,568 chunks, two steps.
   (Distributed: the host all-reduces this per-tensor vector here.)
3. ``_grad_norm_finalize_kernel``: per-tensor norms, the total norm (rounded to the 16-bit dtype it is returned
   in, if so), the finite flag and the clip coefficient ``min(1, max_norm / (total + 1e-6))``, in one program,
   in tensor order.
4. ``_grad_scale_kernel``: every gradient times the coefficient read from device memory; nothing is written
   where the coefficient is 1.

Every reduction runs in a fixed order, so the same gradients give the same bits run to run. NaN propagates as in
``torch.linalg.vector_norm``: a NaN gradient makes its norm, the total and the coefficient NaN.
"""

import triton
import triton.language as tl

CHUNK = 65536  # elements per program in passes 1 and 4
BLOCK = 2048  # elements per loop step (fp32: 8 KB)
REDUCE_BLOCK_C = 1024  # chunk partials per step of one tensor's sum in pass 2
FINALIZE_BLOCK_T = 1024  # tensors per loop step in pass 3
NUM_WARPS = 8
# Small tensors in the interpreter's tests: several chunks each, and several steps of pass 2's sum over them.
INTERPRET_CONFIG = {"CHUNK": 1024, "BLOCK": 256, "REDUCE_BLOCK_C": 4}


@triton.jit
def _nan_max(a, b):
    """max(a, b) that returns NaN when either is NaN, as torch.max does."""
    return tl.where((a != a) | (b != b), float("nan"), tl.maximum(a, b))


@triton.jit
def _chunk(addr_ptr, numel_ptr, meta_ptr, chunk_tensor_ptr, chunk_start_ptr, CHUNK: tl.constexpr):
    """This program's chunk of the table: (tensor address, first element, end, whole aligned chunk?, dtype code)."""
    c = tl.program_id(0)
    t = tl.load(chunk_tensor_ptr + c)
    start = tl.load(chunk_start_ptr + c)
    meta = tl.load(meta_ptr + t)
    end = tl.minimum(start + CHUNK, tl.load(numel_ptr + t))
    vector = (((meta >> 2) & 1) == 1) & (end - start == CHUNK)
    return tl.load(addr_ptr + t), start, end, vector, meta & 3


@triton.jit
def _reduce_range(ptr, start, end, vector, NORM_INF: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Per-lane sums of squares (max |x|) of ``ptr[start:end]`` in fp32, BLOCK lanes.

    ``vector``: the range is one whole CHUNK of a 16-byte aligned tensor, so the loads need no mask and can be
    16-byte vector loads (a mask on a tail would stop the vectorisation of every load).
    """
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    if vector:
        for i in range(0, CHUNK // BLOCK):
            # The hint goes on each block's base pointer: Triton does not carry it through the loop variable.
            x = tl.load(tl.multiple_of(ptr + start + i * BLOCK, 16) + tl.arange(0, BLOCK)).to(tl.float32)
            acc = _nan_max(acc, tl.abs(x)) if NORM_INF else acc + x * x
    else:
        for off in range(start, end, BLOCK):
            offs = off + tl.arange(0, BLOCK)
            x = tl.load(ptr + offs, mask=offs < end, other=0.0).to(tl.float32)
            acc = _nan_max(acc, tl.abs(x)) if NORM_INF else acc + x * x
    return acc


@triton.jit
def _scale_range(ptr, start, end, vector, coef, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """``ptr[start:end] *= coef``, the coefficient first rounded to the tensor's dtype (as torch does)."""
    c = coef.to(ptr.dtype.element_ty).to(tl.float32)
    if vector:
        for i in range(0, CHUNK // BLOCK):
            p = tl.multiple_of(ptr + start + i * BLOCK, 16) + tl.arange(0, BLOCK)
            tl.store(p, (tl.load(p).to(tl.float32) * c).to(ptr.dtype.element_ty))
    else:
        for off in range(start, end, BLOCK):
            offs = off + tl.arange(0, BLOCK)
            x = tl.load(ptr + offs, mask=offs < end).to(tl.float32)
            tl.store(ptr + offs, (x * c).to(ptr.dtype.element_ty), mask=offs < end)


@triton.jit
def _grad_norm_partial_kernel(
    addr_ptr,  # int64 [T]: address of tensor t's first element
    numel_ptr,  # int64 [T]: elements of tensor t
    meta_ptr,  # int64 [T]: dtype_code | aligned << 2
    chunk_tensor_ptr,  # int64 [C]: the tensor of chunk c
    chunk_start_ptr,  # int64 [C]: the first element of chunk c in its tensor (a multiple of CHUNK)
    partial_ptr,  # out, fp32 [C]: sum of squares (max |x|) of chunk c
    NORM_INF: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr,  # CHUNK is a multiple of BLOCK
):
    addr, start, end, vector, dtype_code = _chunk(addr_ptr, numel_ptr, meta_ptr, chunk_tensor_ptr, chunk_start_ptr,
                                                  CHUNK)
    if dtype_code == 0:
        acc = _reduce_range(addr.to(tl.pointer_type(tl.float32)), start, end, vector, NORM_INF, CHUNK, BLOCK)
    elif dtype_code == 1:
        acc = _reduce_range(addr.to(tl.pointer_type(tl.float16)), start, end, vector, NORM_INF, CHUNK, BLOCK)
    else:
        acc = _reduce_range(addr.to(tl.pointer_type(tl.bfloat16)), start, end, vector, NORM_INF, CHUNK, BLOCK)
    if NORM_INF:
        result = tl.max(acc, axis=0)
        result = tl.where(tl.sum((acc != acc).to(tl.int32), axis=0) > 0, float("nan"), result)
    else:
        result = tl.sum(acc, axis=0)
    tl.store(partial_ptr + tl.program_id(0), result)


@triton.jit
def _grad_norm_reduce_kernel(
    partial_ptr,  # fp32 [C]: pass 1's per-chunk results
    chunk_begin_ptr,  # int64 [T + 1]: tensor t owns chunks chunk_begin[t] .. chunk_begin[t+1]-1
    acc_ptr,  # out, fp32 [T]: sum of squares (max |x|) of tensor t
    NORM_INF: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    t = tl.program_id(0)
    begin = tl.load(chunk_begin_ptr + t)
    end = tl.load(chunk_begin_ptr + t + 1)
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for c0 in range(begin, end, BLOCK_C):
        offs = c0 + tl.arange(0, BLOCK_C)
        v = tl.load(partial_ptr + offs, mask=offs < end, other=0.0)
        acc = _nan_max(acc, v) if NORM_INF else acc + v
    if NORM_INF:
        result = tl.max(acc, axis=0)
        result = tl.where(tl.sum((acc != acc).to(tl.int32), axis=0) > 0, float("nan"), result)
    else:
        result = tl.sum(acc, axis=0)
    tl.store(acc_ptr + t, result)


@triton.jit
def _grad_norm_finalize_kernel(
    acc_ptr,  # fp32 [T]: per-tensor sum of squares (max |x|), after any all-reduce
    norms_ptr,  # out, fp32 [T]: per-tensor norms
    total_ptr,  # out, fp32 [1]: the total norm
    finite_ptr,  # out, bool [1]: whether the total norm is finite
    coef_ptr,  # out, fp32 [1]: min(1, max_norm / (total + 1e-6)); NaN if the total is NaN
    scale_ptr,  # fp32 [1]: the gradients' loss scale (GradScaler), read only if HAS_SCALE
    T,
    max_norm,  # fp32
    NORM_INF: tl.constexpr,
    HAS_SCALE: tl.constexpr,  # gradients are multiplied by *scale_ptr: report the unscaled norms
    ROUND_TOTAL: tl.constexpr,  # 0, or 1 / 2: the total is returned in fp16 / bf16; round it before using it
    BLOCK_T: tl.constexpr,
):
    inv_scale = 1.0
    if HAS_SCALE:
        inv_scale = 1.0 / tl.load(scale_ptr)
    total = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        v = tl.load(acc_ptr + t, mask=t < T, other=0.0)
        if NORM_INF:
            total = _nan_max(total, v)
            tl.store(norms_ptr + t, v * inv_scale, mask=t < T)
        else:
            total += v
            tl.store(norms_ptr + t, tl.sqrt(v) * inv_scale, mask=t < T)
    if NORM_INF:
        norm = tl.max(total, axis=0)
        norm = tl.where(tl.sum((total != total).to(tl.int32), axis=0) > 0, float("nan"), norm)
    else:
        norm = tl.sqrt(tl.sum(total, axis=0))
    norm = norm * inv_scale
    if ROUND_TOTAL == 1:  # what the caller will see: a total that overflows fp16 is inf, as in torch
        norm = norm.to(tl.float16).to(tl.float32)
    elif ROUND_TOTAL == 2:
        norm = norm.to(tl.bfloat16).to(tl.float32)
    tl.store(total_ptr, norm)
    tl.store(finite_ptr, (norm == norm) & (norm < float("inf")))
    coef = max_norm / (norm + 1e-6)
    tl.store(coef_ptr, tl.where(coef > 1.0, 1.0, coef))  # not tl.minimum: a NaN coefficient must stay NaN


@triton.jit
def _grad_scale_kernel(
    addr_ptr, numel_ptr, meta_ptr, chunk_tensor_ptr, chunk_start_ptr,  # the table, as in pass 1
    coef_ptr,  # fp32 [1]: the clip coefficient from pass 3
    CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    coef = tl.load(coef_ptr)
    if coef != 1.0:  # NaN != 1.0 too: NaN gradients stay NaN, as with torch's clip_grad_norm_
        addr, start, end, vector, dtype_code = _chunk(addr_ptr, numel_ptr, meta_ptr, chunk_tensor_ptr,
                                                      chunk_start_ptr, CHUNK)
        if dtype_code == 0:
            _scale_range(addr.to(tl.pointer_type(tl.float32)), start, end, vector, coef, CHUNK, BLOCK)
        elif dtype_code == 1:
            _scale_range(addr.to(tl.pointer_type(tl.float16)), start, end, vector, coef, CHUNK, BLOCK)
        else:
            _scale_range(addr.to(tl.pointer_type(tl.bfloat16)), start, end, vector, coef, CHUNK, BLOCK)
