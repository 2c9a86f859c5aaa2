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
  (with a residual, g is read back instead of recomputed from grad_out and y); only where the GEMMs do not
  compute dz as they load (``BN_GRAD`` in kernels/conv_bias_relu.py, the same formula).

Per-channel vectors come as one fp32 (6, C) table ``chan``: rows mean, invstd, scale (gamma * invstd), beta (0
without one), b, k (the last two for the gradient only). Everything is computed in fp32 (the tiles' combination
in fp64). Two small kernels over
(tiles, C) partials write it, one launch each where torch ops took about 15 and 7:

- ``_batch_norm_statistics_kernel``: the forward's mean and biased variance from the conv kernel's per-tile
  statistics (Chan's parallel formula, in fp64), and the table's first four rows; in the backward, the same rows
  from the saved mean and variance.
- ``_batch_norm_grad_coefficients_kernel``: the sums of g and g * xhat over the row blocks, and b and k.
"""

import triton
import triton.language as tl

# Memory-bound: one config each, no tuning. 64 rows x 64 channels, 8 warps: 16 values a thread (with 4 warps,
# triton 3.6 spilled a pointer of the forward pass on sm_80 at 48 registers; `cnnperf audit`).
CONFIG = {"BLOCK_M": 64, "BLOCK_C": 64, "num_warps": 8}
INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_C": 16, "num_warps": 1}
# The per-channel finalizations over (tiles, C) partials: 16 channels a program (4 programs for 64 channels), 64
# tiles a step. Small enough in the interpreter that the tests' shapes take several steps and partial blocks.
FINALIZE_CONFIG = {"BLOCK_T": 64, "BLOCK_C": 16, "num_warps": 4}
INTERPRET_FINALIZE_CONFIG = {"BLOCK_T": 2, "BLOCK_C": 4, "num_warps": 1}


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


@triton.jit
def _batch_norm_statistics_kernel(
    stats_ptr,  # FROM_TILES: fp32 (2, T, C), per row tile of TILE_M rows (the last may be partial): the sum, and
    # rows^2 x the squared deviations from the tile's mean (the conv kernel's STATS epilogue)
    mean_ptr, var_ptr,  # fp32 (C,): out with FROM_TILES (the batch's mean and biased variance), else in
    weight_ptr, bias_ptr,  # the BatchNorm's gamma and beta (C,), any float dtype; read if HAS_WEIGHT / HAS_BIAS
    chan_ptr,  # out: fp32 (6, C): mean, invstd, scale, beta, and zeros in the gradient's two rows
    M, C, T, TILE_M, eps,  # rows, channels, tiles, rows per tile (FROM_TILES), the BatchNorm's eps
    FROM_TILES: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    if FROM_TILES:
        # Chan's parallel formula in fp64, two passes over the tiles (the second from L2):
        # mean = sum S_i / M; M2 = sum (Q_i / n_i^2) + sum n_i (S_i / n_i - mean)^2.
        total = tl.zeros([BLOCK_C], dtype=tl.float64)
        for t0 in range(0, T, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            mask = (offs_t < T)[:, None] & mask_c[None, :]
            s = tl.load(stats_ptr + offs_t[:, None] * C + offs_c[None, :], mask=mask, other=0.0)
            total += tl.sum(s.to(tl.float64), axis=0)
        mean = total / M
        m2 = tl.zeros([BLOCK_C], dtype=tl.float64)
        for t0 in range(0, T, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            mask = (offs_t < T)[:, None] & mask_c[None, :]
            rows = tl.where(offs_t == T - 1, M - TILE_M * (T - 1), TILE_M).to(tl.float64)
            inv = (1.0 / rows)[:, None]
            offs = offs_t[:, None] * C + offs_c[None, :]
            s = tl.load(stats_ptr + offs, mask=mask, other=0.0).to(tl.float64)
            q = tl.load(stats_ptr + T * C + offs, mask=mask, other=0.0).to(tl.float64)
            d = s * inv - mean[None, :]
            m2 += tl.sum(tl.where(mask, q * inv * inv + rows[:, None] * d * d, 0.0), axis=0)
        mean32 = mean.to(tl.float32)
        var32 = (m2 / M).to(tl.float32)
        tl.store(mean_ptr + offs_c, mean32, mask=mask_c)
        tl.store(var_ptr + offs_c, var32, mask=mask_c)
    else:
        mean32 = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.0)
        var32 = tl.load(var_ptr + offs_c, mask=mask_c, other=1.0)
    invstd = tl.rsqrt(var32 + eps)
    scale = invstd
    if HAS_WEIGHT:
        scale = invstd * tl.load(weight_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    beta = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_BIAS:
        beta = tl.load(bias_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    tl.store(chan_ptr + offs_c, mean32, mask=mask_c)
    tl.store(chan_ptr + C + offs_c, invstd, mask=mask_c)
    tl.store(chan_ptr + 2 * C + offs_c, scale, mask=mask_c)
    tl.store(chan_ptr + 3 * C + offs_c, beta, mask=mask_c)
    tl.store(chan_ptr + 4 * C + offs_c, tl.zeros([BLOCK_C], dtype=tl.float32), mask=mask_c)
    tl.store(chan_ptr + 5 * C + offs_c, tl.zeros([BLOCK_C], dtype=tl.float32), mask=mask_c)


@triton.jit
def _batch_norm_grad_coefficients_kernel(
    partial_ptr,  # fp32 (2, T, C): per row block, the sums of g and of g * xhat (_batch_norm_relu_grad_sums_kernel)
    chan_ptr,  # fp32 (6, C): reads invstd and scale, writes the gradient's b and k
    sums_ptr,  # out: fp32 (2, C): sum of g (beta's gradient) and of g * xhat (gamma's)
    M, C, T,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    sum_g = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_gx = tl.zeros([BLOCK_C], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask = (offs_t < T)[:, None] & mask_c[None, :]
        offs = offs_t[:, None] * C + offs_c[None, :]
        sum_g += tl.sum(tl.load(partial_ptr + offs, mask=mask, other=0.0), axis=0)
        sum_gx += tl.sum(tl.load(partial_ptr + T * C + offs, mask=mask, other=0.0), axis=0)
    scale = tl.load(chan_ptr + 2 * C + offs_c, mask=mask_c, other=0.0)
    invstd = tl.load(chan_ptr + C + offs_c, mask=mask_c, other=0.0)
    tl.store(chan_ptr + 4 * C + offs_c, scale * sum_g / M, mask=mask_c)
    tl.store(chan_ptr + 5 * C + offs_c, scale * invstd * sum_gx / M, mask=mask_c)
    tl.store(sums_ptr + offs_c, sum_g, mask=mask_c)
    tl.store(sums_ptr + C + offs_c, sum_gx, mask=mask_c)
