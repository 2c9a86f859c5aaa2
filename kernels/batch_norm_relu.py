"""Triton kernels of the BatchNorm + ReLU around the fused Conv -> BatchNorm -> ReLU (memory-bound passes).

The convolution itself is ``kernels/conv_bias_relu.py``'s forward with ``STATS=True`` (it stores z and the
per-tile statistics) and its dgrad / wgrad GEMMs. Here, over NHWC rows (M = N*OH*OW rows, C channels):

- ``_batch_norm_relu_kernel``: y = relu((z - mean) * scale + beta (+ residual)), the forward's one light pass.
- ``_batch_norm_relu_grad_sums_kernel``: g = grad_out where (z - mean) * scale + beta > 0 (the ReLU's mask,
  recomputed from z: the output is not saved), or with a residual where the saved output y > 0; per row block
  the sums of g and of g * xhat, xhat = (z - mean) * invstd (summed over the blocks afterwards: deterministic,
  no atomics). With a residual it also writes g, the residual's gradient.
- ``_batch_norm_relu_grad_kernel``: dz = scale * g - b - (z - mean) * k, the BatchNorm's input gradient with
  the per-channel b = scale * sum(g) / M and k = scale * invstd * sum(g * xhat) / M, written NHWC for the GEMMs
  (with a residual, g is read back instead of recomputed from grad_out and y).

Per-channel vectors come as one fp32 (6, C) table ``chan``: rows mean, invstd, scale (gamma * invstd), beta (0
without one), b, k (the last two for the gradient only). Everything is computed in fp32.
"""

import triton
import triton.language as tl

# Memory-bound: one config each, no tuning. 64 rows x 64 channels, 8 warps: 16 values a thread (with 4 warps,
# triton 3.6 spilled a pointer of the forward pass on sm_80 at 48 registers; `cnnperf audit`).
CONFIG = {"BLOCK_M": 64, "BLOCK_C": 64, "num_warps": 8}
INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_C": 16, "num_warps": 1}

MEAN, INVSTD, SCALE, BETA, GRAD_B, GRAD_K = range(6)  # the rows of ``chan``


@triton.jit
def _channel_vector(chan_ptr, row: tl.constexpr, offs_c, mask_c, C):
    return tl.load(chan_ptr + row * C + offs_c, mask=mask_c, other=0.0)[None, :]


@triton.jit
def _batch_norm_relu_kernel(
    z_ptr,  # conv output, contiguous NHWC (M, C)
    res_ptr,  # HAS_RESIDUAL: the residual, contiguous NHWC (M, C)
    chan_ptr,  # fp32 (6, C): mean, invstd, scale, beta, ...
    y_ptr,  # out: contiguous NHWC (M, C), z's dtype
    M, C,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mask = (offs_m < M)[:, None] & mask_c[None, :]
    offs = offs_m[:, None] * C + offs_c[None, :]
    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = ((z - _channel_vector(chan_ptr, 0, offs_c, mask_c, C)) * _channel_vector(chan_ptr, 2, offs_c, mask_c, C)
         + _channel_vector(chan_ptr, 3, offs_c, mask_c, C))
    if HAS_RESIDUAL:
        y += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, tl.maximum(y, 0.0).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _masked_grad(go_ptr, z_ptr, y_ptr, chan_ptr, offs_m, offs_c, M, C, P, sgn, sgp, sgc,
                 HAS_RESIDUAL: tl.constexpr):
    """(g, z - mean, mask_c, mask) of one tile: g = grad_out where the forward's output was positive (y > 0 with
    a residual, else recomputed from z)."""
    mask_c = offs_c < C
    mask = (offs_m < M)[:, None] & mask_c[None, :]
    n_idx = offs_m // P
    p = offs_m % P
    go = tl.load(go_ptr + (n_idx * sgn + p * sgp)[:, None] + offs_c[None, :] * sgc, mask=mask, other=0.0)
    rows = offs_m[:, None] * C + offs_c[None, :]
    z = tl.load(z_ptr + rows, mask=mask, other=0.0).to(tl.float32)
    centred = z - _channel_vector(chan_ptr, 0, offs_c, mask_c, C)
    if HAS_RESIDUAL:
        positive = tl.load(y_ptr + rows, mask=mask, other=0.0) > 0
    else:
        positive = (centred * _channel_vector(chan_ptr, 2, offs_c, mask_c, C)
                    + _channel_vector(chan_ptr, 3, offs_c, mask_c, C)) > 0
    g = tl.where(positive, go.to(tl.float32), 0.0)
    return g, centred, mask_c, mask


@triton.jit
def _batch_norm_relu_grad_sums_kernel(
    go_ptr,  # grad of the output, 4-D with flattenable (OH, OW): go[n, c, p] at n*sgn + p*sgp + c*sgc
    z_ptr,  # conv output, contiguous NHWC (M, C)
    y_ptr,  # HAS_RESIDUAL: the forward's output (its ReLU's mask), contiguous NHWC (M, C)
    chan_ptr,  # fp32 (6, C)
    partial_ptr,  # out: fp32 (2, cdiv(M, BLOCK_M), C): per row block, sum of g and sum of g * xhat
    g_ptr,  # out, HAS_RESIDUAL: g (the residual's gradient), contiguous NHWC (M, C)
    M, C, P,  # rows, channels, pixels per image (OH*OW)
    sgn, sgp, sgc,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    g, centred, mask_c, mask = _masked_grad(go_ptr, z_ptr, y_ptr, chan_ptr, offs_m, offs_c, M, C, P, sgn, sgp,
                                            sgc, HAS_RESIDUAL)
    if HAS_RESIDUAL:
        tl.store(g_ptr + offs_m[:, None] * C + offs_c[None, :], g.to(g_ptr.dtype.element_ty), mask=mask)
    xhat = centred * _channel_vector(chan_ptr, 1, offs_c, mask_c, C)
    out = partial_ptr + pid_m * C + offs_c
    tl.store(out, tl.sum(g, axis=0), mask=mask_c)
    tl.store(out + tl.num_programs(0) * C, tl.sum(tl.where(mask, g * xhat, 0.0), axis=0), mask=mask_c)


@triton.jit
def _batch_norm_relu_grad_kernel(
    go_ptr,  # grad of the output, as in _batch_norm_relu_grad_sums_kernel (not read with HAS_RESIDUAL)
    z_ptr,  # conv output, contiguous NHWC (M, C)
    g_ptr,  # HAS_RESIDUAL: g as the sums kernel wrote it
    chan_ptr,  # fp32 (6, C), all six rows
    dz_ptr,  # out: grad of z, contiguous NHWC (M, C), z's dtype
    M, C, P,
    sgn, sgp, sgc,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rows = offs_m[:, None] * C + offs_c[None, :]
    if HAS_RESIDUAL:  # g is there already: no residual to read again for the mask
        mask_c = offs_c < C
        mask = (offs_m < M)[:, None] & mask_c[None, :]
        g = tl.load(g_ptr + rows, mask=mask, other=0.0).to(tl.float32)
        centred = (tl.load(z_ptr + rows, mask=mask, other=0.0).to(tl.float32)
                   - _channel_vector(chan_ptr, 0, offs_c, mask_c, C))
    else:
        g, centred, mask_c, mask = _masked_grad(go_ptr, z_ptr, z_ptr, chan_ptr, offs_m, offs_c, M, C, P, sgn, sgp,
                                                sgc, False)
    dz = (g * _channel_vector(chan_ptr, 2, offs_c, mask_c, C) - _channel_vector(chan_ptr, 4, offs_c, mask_c, C)
          - centred * _channel_vector(chan_ptr, 5, offs_c, mask_c, C))
    tl.store(dz_ptr + rows, dz.to(dz_ptr.dtype.element_ty), mask=mask)
