"""Triton kernels of the fused conv2d + bias + ReLU, and their config lists.

All kernels work on NHWC (channels_last) activations, so that the GEMM's reduction axis (channels) is
contiguous in memory, and on the weight permuted to (C_out, KH, KW, C_in/groups), contiguous.

- ``_conv_bias_relu_fwd_kernel``: implicit GEMM, M = N*OH*OW output pixels, N = C_out/groups, K = KH*KW*C_in/g,
  one loop over (kh, kw, channel block); bias (+ a residual, ``HAS_RESIDUAL``: a ResNet block's last conv with
  its BatchNorm folded, in eval) + ReLU in the epilogue. Groups are the grid's second axis.
- ``_conv_dgrad_kernel``: grad_input as one implicit GEMM per stride phase (the input pixels with
  ``ih % stride_h == ph``, ``iw % stride_w == pw``), over only the taps that reach that phase: every tap is then
  valid for all the phase's pixels but the borders (no MMA on the zero rows a stride would leave).
- ``_conv_wgrad_kernel``: grad_weight as a GEMM reducing over M = N*OH*OW, split into ``SPLIT`` slices written
  to an fp32 workspace; ``_split_k_sum_kernel`` adds them in order (deterministic) and writes the gradient in
  the weight's dtype and layout in the same pass. ``BIAS_GRAD``: the CTAs of the first tap and channel block
  also sum their grad-output tiles, the bias gradient's partial sums per slice (no pass of their own).
- ``MASK_Y`` (dgrad and wgrad): the ReLU's backward, g = grad_out * (out > 0), applied where grad_out is loaded
  as an operand (the saved output is loaded beside it), so g is never written to memory.
- ``BN_GRAD`` (dgrad and wgrad, FusedConv2dBatchNormReLU's backward): the operand is the BatchNorm's input
  gradient dz = scale * g - b - (z - mean) * k, computed in fp32 from the grad_out (or g) and z tiles as they are
  loaded (``MASK_Y`` then recomputes the ReLU's mask from z) with the per-channel table of
  kernels/batch_norm_relu.py, where the performance model predicts that faster than a dz pass.
- ``_relu_mask_bias_grad_kernel``: g = grad_out * (out > 0) written NHWC, and the bias gradient's partial sums
  per row block in the same pass (summed afterwards: deterministic, no atomics); only where the two GEMMs
  cannot read grad_out and out directly (not channels_last, or a bias gradient without a weight gradient).

``SPLIT_K`` (forward and dgrad): a grid too small to fill the GPU (a late layer at batch 32) cuts the K loop
into slices written to an fp32 workspace; ``_split_k_sum_kernel`` adds them in order (deterministic), with the
forward's bias (residual) and ReLU.

``FOLD_C`` (forward and wgrad): with a few input channels per group (an RGB stem: 3), one tap's channels would
fill 3 of a 16-64 wide K (or N) block; instead the (kw, c) pairs of a filter row, contiguous in the weight, form
that block (7 x 3 = 21 of 32).

Accumulation is fp32 throughout; ``INPUT_PRECISION`` is "tf32" or "ieee" for fp32 operands of ``tl.dot``.
Indices are 32-bit: the host sends tensors over 2**31 elements to the reference path.
"""

import triton
import triton.language as tl


def _configs(rows):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for m, n, k, w, s in rows]


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). 16-bit operands; fp32 operands use half the BLOCK_K so
# that the pipelined tiles stay within sm_80's 163 KB of shared memory (checked by `cnnperf audit`).
FWD_CONFIGS_16 = _configs([
    (128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 128, 32, 4, 4),
    (64, 64, 64, 4, 4), (256, 128, 32, 8, 4), (64, 64, 32, 4, 5), (128, 256, 32, 8, 4),
    (64, 64, 16, 4, 5),  # a folded 3x3 RGB stem: its (kw, c) block is 9 wide, 9 of 16 useful instead of 9 of 32
])
FWD_CONFIGS_32 = _configs([
    (128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 32, 4, 4), (128, 128, 16, 4, 4),
])
# The forward with STATS (FusedConv2dBatchNormReLU: BatchNorm statistics in the epilogue), whose reductions
# need more registers: under triton 3.6, 128x64x64 w4 (16-bit) and 128x128x16 w4 (fp32) spilled on sm_80 there
# (`cnnperf audit`). So 128-row tiles run 8 warps.
def _stats_configs(configs):
    return [triton.Config(c.kwargs, num_warps=8 if c.kwargs["BLOCK_M"] >= 128 else c.num_warps,
                          num_stages=c.num_stages) for c in configs]


FWD_STATS_CONFIGS_16 = _stats_configs(FWD_CONFIGS_16)
FWD_STATS_CONFIGS_32 = _stats_configs(FWD_CONFIGS_32)
# The forward with HAS_RESIDUAL holds the residual's tile in its epilogue too: the STATS lists' warps (with 4,
# fp32 128x128x16 spilled 352-424 B on sm_80 and sm_90), without the tiles over 128x128 (128x256x32 w8 bf16
# spilled 16 B on sm_90 under triton 3.6; `cnnperf audit`).
FWD_RESIDUAL_CONFIGS_16 = [c for c in FWD_STATS_CONFIGS_16 if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 128]
FWD_RESIDUAL_CONFIGS_32 = [c for c in FWD_STATS_CONFIGS_32 if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 128]
# dgrad: M = input pixels of a stride phase, N = C_in/groups, K = (taps, C_out/groups). The forward's tiles, except
# where the dgrad's extra index math spills on sm_80 (`cnnperf audit`: 128x64x64 w4 and 256x128x64 w8 16-bit,
# 64x128x32 w4 and 128x128x16 w4 fp32, under triton 3.6 or 3.8; 64x64x32 w4 fp32, 24 B under 3.8 once the
# kernel took the ReLU mask's Y pointer): those get 8 warps, and the 256x128 tile half the BLOCK_K.
DGRAD_CONFIGS_16 = _configs([
    (128, 128, 64, 8, 3), (128, 64, 64, 8, 4), (64, 128, 64, 4, 4), (128, 128, 32, 4, 4),
    (64, 64, 64, 4, 4), (256, 128, 32, 8, 3), (64, 64, 32, 4, 5), (128, 256, 32, 8, 4),
])
DGRAD_CONFIGS_32 = _configs([
    (128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 8, 4), (64, 64, 32, 8, 4), (128, 128, 16, 8, 4),
])
# wgrad: M = C_out/groups, N = C_in/groups (one (kh, kw) per tile), K = output pixels. fp32 128x64 takes 8 warps:
# with 4, the bias gradient's tf32x3 MMA spills on sm_90 (144 B, `cnnperf audit`).
WGRAD_CONFIGS_16 = _configs([
    (128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (64, 64, 32, 4, 4),
    (256, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 32, 64, 4, 4),
])
WGRAD_CONFIGS_32 = _configs([
    (128, 128, 32, 8, 3), (128, 64, 32, 8, 4), (64, 64, 32, 4, 4), (64, 64, 16, 4, 4),
])
# The interpreter cannot autotune (it has no GPU to time configs): one fixed, small config each.
INTERPRET_FWD_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 4}
INTERPRET_DGRAD_CONFIG = INTERPRET_FWD_CONFIG
INTERPRET_WGRAD_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 1}
# The mask/bias pass and the split-K sum are memory-bound: one config each, no tuning.
MASK_CONFIG = {"BLOCK_M": 64, "BLOCK_C": 64, "num_warps": 4}
SPLIT_K_SUM_CONFIG = {"BLOCK_R": 64, "BLOCK_C": 64, "num_warps": 4}

# Autotune key: the problem's shape (tensor dtypes are added by the autotuner itself).
_SHAPE_KEY = ["N", "H", "W", "C_in", "OH", "OW", "C_out", "C_in_g", "C_out_g", "KH", "KW", "stride_h", "stride_w",
              "dil_h", "dil_w"]


@triton.jit
def _grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Map a linear program id to a (pid_m, pid_n) tile, GROUP_M row tiles at a time, for L2 reuse."""
    width = GROUP_M * num_pid_n
    group_id = pid // width
    first_m = group_id * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def _k_slice(iters, k_slice, SPLIT_K: tl.constexpr):
    """[it0, it1): the K iterations of slice ``k_slice`` of ``SPLIT_K`` (equal slices, the last shorter)."""
    per = tl.cdiv(iters, SPLIT_K)
    it0 = tl.minimum(k_slice * per, iters)
    return it0, tl.minimum(it0 + per, iters)


@triton.jit
def _split_k_sum_kernel(
    ws_ptr,  # fp32 (SPLIT_K, R, C): the slices' partial sums
    b_ptr,  # bias (C,), read only if HAS_BIAS
    r_ptr,  # residual, contiguous (R, C), read only if HAS_RESIDUAL
    out_ptr,  # out, in its own dtype: row r at r * s_r; column c at c, or (WEIGHT) at ci*s_ci + kh*s_kh + kw*s_kw
    R, C, SPLIT_K,
    s_r,
    C_in_g, KW, s_ci, s_kh, s_kw,  # WEIGHT only: column c = (kh * KW + kw) * C_in_g + ci of a (C_out, K) matrix
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, WEIGHT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out = relu?(sum of the slices in order + bias? + residual?), cast to out's dtype: deterministic (no
    atomics), one pass. WEIGHT: the wgrad's (C_out, KH*KW*C_in_g) sums land in the weight's own layout (any
    strides)."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_r < R)[:, None] & (offs_c < C)[None, :]
    offs = offs_r[:, None] * C + offs_c[None, :]
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for k in range(0, SPLIT_K):
        acc += tl.load(ws_ptr + k * R * C + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_c, mask=offs_c < C, other=0.0).to(tl.float32)[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        acc = tl.maximum(acc, 0.0)
    if WEIGHT:
        tap = offs_c // C_in_g
        cols = (offs_c % C_in_g) * s_ci + (tap // KW) * s_kh + (tap % KW) * s_kw
    else:
        cols = offs_c
    tl.store(out_ptr + offs_r[:, None] * s_r + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _channel_mask(offs, channels, EVEN: tl.constexpr, BLOCK: tl.constexpr):
    """offs < channels, or a constant all-true mask when the channel count is a multiple of the block (the
    compiler then drops the compare and the predicate selects from the loads)."""
    if EVEN:
        return tl.full((BLOCK,), 1, tl.int1)
    return offs < channels


@triton.jit
def _taps_in_image(ih0, iw0, mask_m, H, W, dil_h, dil_w, KH: tl.constexpr, KW: tl.constexpr):
    """Per row: bit kh*KW + kw set iff tap (kh, kw) of the row's window lies inside the H x W image (and the row
    is a real one). int32 up to 32 taps, int64 up to 64 (a 7x7 filter has 49); not for more."""
    if KH * KW <= 32:
        bits = tl.zeros_like(ih0)
    else:
        bits = tl.zeros_like(ih0).to(tl.int64)
    for kh in tl.static_range(KH):
        ih = ih0 + kh * dil_h
        h_ok = mask_m & (ih >= 0) & (ih < H)
        for kw in tl.static_range(KW):
            iw = iw0 + kw * dil_w
            ok = h_ok & (iw >= 0) & (iw < W)
            bits = bits | (ok.to(bits.dtype) << (kh * KW + kw))
    return bits


@triton.jit
def _conv_bias_relu_fwd_kernel(
    x_ptr,  # input, NHWC memory: x[n, h, w, c] at n*sxn + h*sxh + w*sxw + c
    w_ptr,  # weight, contiguous (C_out, KH, KW, C_in_g)
    b_ptr,  # bias (C_out,), read only if HAS_BIAS
    y_ptr,  # output, contiguous NHWC (N*OH*OW, C_out)
    ws_ptr,  # fp32 workspace (SPLIT_K, N*OH*OW, C_out) when SPLIT_K > 1: partial sums, no bias or ReLU yet
    stats_ptr,  # STATS: fp32 (2, cdiv(N*OH*OW, BLOCK_M), C_out): per row tile, sum and rows^2 x squared deviations
    r_ptr,  # HAS_RESIDUAL: the residual added before the ReLU, contiguous NHWC like y
    N, H, W, C_in,  # input sizes (C_in: all groups)
    OH, OW, C_out,  # output sizes (C_out: all groups)
    sxn, sxh, sxw,  # input strides in elements; the channel stride is 1
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    C_in_g, C_out_g,  # channels per group
    KH: tl.constexpr, KW: tl.constexpr,  # filter size
    SPLIT_K: tl.constexpr,  # slices of the K loop (the grid's second axis is groups x SPLIT_K); 1: bias, ReLU here
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,  # y = relu(conv + bias + residual) (not with STATS)
    STATS: tl.constexpr,  # no ReLU: store z = conv + bias and its BatchNorm statistics per tile (SPLIT_K == 1)
    EVEN_K: tl.constexpr,  # C_in_g is a multiple of BLOCK_K: no channel mask in the K loop
    EVEN_N: tl.constexpr,  # C_out_g is a multiple of BLOCK_N: no column mask on the weight loads and stores
    FOLD_C: tl.constexpr,  # 0, or C_in_g when it is small: K runs over (kh, (kw, c)) (see _fold_loop)
    INPUT_PRECISION: tl.constexpr,  # "tf32" or "ieee" for fp32 operands
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    group = tl.program_id(1) // SPLIT_K
    k_slice = tl.program_id(1) % SPLIT_K
    M = N * OH * OW
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(C_out_g, BLOCK_N), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # output pixels
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output channels within the group
    mask_m = offs_m < M
    mask_n = _channel_mask(offs_n, C_out_g, EVEN_N, BLOCK_N)
    n_idx = offs_m // (OH * OW)
    hw = offs_m % (OH * OW)
    ih0 = (hw // OW) * stride_h - pad_h
    iw0 = (hw % OW) * stride_w - pad_w
    # Per row, once: the address of tap (0, 0), channel 0 of this group (a tap adds a scalar offset), and which
    # taps fall inside the image, one bit each: the K loop then does no per-row index math and no division.
    x_rows = x_ptr + n_idx * sxn + ih0 * sxh + iw0 * sxw + group * C_in_g
    co = group * C_out_g + offs_n
    w_cols = w_ptr + co * (KH * KW * C_in_g)
    offs_kb = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FOLD_C > 0:
        # A few input channels (an RGB stem): the KW taps of a filter row and their channels are one K block
        # (7 x 3 = 21 of 32 useful instead of 3 of 32 per tap).
        KF: tl.constexpr = KW * FOLD_C
        it0, it1 = _k_slice(KH * tl.cdiv(KF, BLOCK_K), k_slice, SPLIT_K)
        for it in range(it0, it1):
            kh = it // tl.cdiv(KF, BLOCK_K)
            j = (it % tl.cdiv(KF, BLOCK_K)) * BLOCK_K + offs_kb  # (kw, c) of the filter row, flattened
            kw_j = j // FOLD_C
            ih = ih0 + kh * dil_h
            iw = iw0[:, None] + (kw_j * dil_w)[None, :]
            ok = ((mask_m & (ih >= 0) & (ih < H))[:, None] & (iw >= 0) & (iw < W)) & (j < KF)[None, :]
            a = tl.load((x_rows + kh * dil_h * sxh)[:, None] + (kw_j * dil_w * sxw + j % FOLD_C)[None, :],
                        mask=ok, other=0.0)
            b = tl.load(w_cols[None, :] + (kh * KF + j)[:, None], mask=(j < KF)[:, None] & mask_n[None, :],
                        other=0.0)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    else:
        # Per row, once: the address of tap (0, 0), channel 0 of this group (a tap adds a scalar offset), and
        # which taps fall inside the image, one bit each: the K loop does no per-row index math, no division.
        if KH * KW <= 64:
            taps_ok = _taps_in_image(ih0, iw0, mask_m, H, W, dil_h, dil_w, KH, KW)
        c_blocks = tl.cdiv(C_in_g, BLOCK_K)
        # One flat loop over (tap, channel block) so that Triton pipelines its loads; the tap and the channel
        # block are carried from one iteration to the next (from this K slice's first: divisions once).
        it0, it1 = _k_slice(KH * KW * c_blocks, k_slice, SPLIT_K)
        c0 = (it0 % c_blocks) * BLOCK_K
        kh = (it0 // c_blocks) // KW
        kw = (it0 // c_blocks) % KW
        for _ in range(it0, it1):
            tap = kh * KW + kw
            if KH * KW <= 64:
                row_ok = ((taps_ok >> tap) & 1) != 0
            else:  # a filter over 64 taps (9x9 and up): the bounds per iteration, as no word holds its bits
                ih = ih0 + kh * dil_h
                iw = iw0 + kw * dil_w
                row_ok = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            offs_k = c0 + offs_kb
            mask_k = _channel_mask(offs_k, C_in_g, EVEN_K, BLOCK_K)
            # The tap's and the channel block's offsets summed as ints first: one 64-bit add per row, not two.
            a = tl.load(x_rows[:, None] + (kh * dil_h * sxh + kw * dil_w * sxw + offs_k)[None, :],
                        mask=row_ok[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(w_cols[None, :] + (tap * C_in_g + offs_k)[:, None],
                        mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
            c0 += BLOCK_K
            next_tap = c0 >= C_in_g
            c0 = tl.where(next_tap, 0, c0)
            kw = tl.where(next_tap, kw + 1, kw)
            next_row = kw == KW
            kw = tl.where(next_row, 0, kw)
            kh = tl.where(next_row, kh + 1, kh)

    y_offs = offs_m[:, None] * C_out + co[None, :]
    if SPLIT_K > 1:  # _split_k_sum_kernel adds the slices in order, then the bias, the residual and the ReLU
        tl.store(ws_ptr + k_slice * M * C_out + y_offs, acc, mask=mask_m[:, None] & mask_n[None, :])
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + co, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if STATS:
            # The BatchNorm's batch statistics of the values stored (rounded to z's dtype), per channel: this
            # tile's sum and its rows' squared deviations from the tile's mean, times rows^2 (rows * z - sum:
            # no division here, whose slow path costs a stack frame on sm_80), combined over the tiles with
            # Chan's formula on the host (no E[z^2] - mean^2 cancellation).
            z = acc.to(y_ptr.dtype.element_ty)
            tl.store(y_ptr + y_offs, z, mask=mask_m[:, None] & mask_n[None, :])
            zf = tl.where(mask_m[:, None], z.to(tl.float32), 0.0)
            tile_sum = tl.sum(zf, axis=0)
            # The tile's statistics row from offs_m, not pid_m * C_out: that one, kept across the K loop, spilled
            # a register on sm_80 (64x64x32 w4 s5; `cnnperf audit`, which checks every variant of this epilogue).
            first_row = tl.min(offs_m, axis=0)
            rows = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
            dev = tl.where(mask_m[:, None], zf * rows - tile_sum[None, :], 0.0)
            stats = stats_ptr + (first_row // BLOCK_M) * C_out + co
            tl.store(stats, tile_sum, mask=mask_n)
            tl.store(stats + tl.cdiv(M, BLOCK_M) * C_out, tl.sum(dev * dev, axis=0), mask=mask_n)
        else:
            if HAS_RESIDUAL:
                acc += tl.load(r_ptr + y_offs, mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
            acc = tl.maximum(acc, 0.0)
            tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _relu_mask_bias_grad_kernel(
    go_ptr,  # grad of the output, 4-D with flattenable (OH, OW): go[n, c, p] at n*sgn + p*sgp + c*sgc
    y_ptr,  # saved output, same indexing with its own strides
    g_ptr,  # out: grad_out * (y > 0), contiguous (M, C), M = N*OH*OW
    partial_ptr,  # out: fp32 (cdiv(M, BLOCK_M), C) per-row-block sums of g (the bias gradient), if COMPUTE_BIAS
    M, C, P,  # rows, channels, pixels per image (OH*OW)
    sgn, sgp, sgc,
    syn, syp, syc,
    COMPUTE_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_m < M)[:, None] & (offs_c < C)[None, :]
    n_idx = offs_m // P
    p = offs_m % P
    go = tl.load(go_ptr + (n_idx * sgn + p * sgp)[:, None] + offs_c[None, :] * sgc, mask=mask, other=0.0)
    y = tl.load(y_ptr + (n_idx * syn + p * syp)[:, None] + offs_c[None, :] * syc, mask=mask, other=0.0)
    g = tl.where(y > 0, go, tl.zeros_like(go))
    tl.store(g_ptr + offs_m[:, None] * C + offs_c[None, :], g, mask=mask)
    if COMPUTE_BIAS:
        tl.store(partial_ptr + pid_m * C + offs_c, tl.sum(g.to(tl.float32), axis=0), mask=offs_c < C)


@triton.jit
def _phase_taps(phase, pad, dil, stride, step, K: tl.constexpr):
    """(first tap, number of taps) along one axis that reach input rows ``i % stride == phase``: tap t does iff
    (phase + pad - t*dil) % stride == 0, and those taps are first + j*step (cnnperf.perf_model.phase_taps)."""
    first = K
    for t in range(0, step):
        first = tl.minimum(first, tl.where((phase + pad - t * dil) % stride == 0, t, K))
    count = tl.where(first < K, (K - first + step - 1) // step, 0)
    return first, count


@triton.jit
def _channel_row(chan_ptr, row: tl.constexpr, channels, mask_c, C, AXIS: tl.constexpr):
    v = tl.load(chan_ptr + row * C + channels, mask=mask_c, other=0.0)
    return v[None, :] if AXIS == 1 else v[:, None]


@triton.jit
def _batch_norm_dz(g, z_ptrs, chan_ptr, channels, rows_ok, mask_c, C, MASK: tl.constexpr, AXIS: tl.constexpr):
    """The BatchNorm's input gradient from a tile of the grad of its output (``g``) as loaded, in g's dtype:
    dz = scale * g' - b - (z - mean) * k, g' = g where the ReLU passed (``MASK``: (z - mean) * scale + beta > 0,
    recomputed as kernels/batch_norm_relu.py does; else g is masked already), 0 outside the tile's valid rows
    and ``channels`` (along ``AXIS``). Per-channel vectors from the fp32 (6, C) table: mean, invstd, scale, beta,
    b, k."""
    ok = rows_ok & (mask_c[None, :] if AXIS == 1 else mask_c[:, None])
    centred = (tl.load(z_ptrs, mask=ok, other=0.0).to(tl.float32)
               - _channel_row(chan_ptr, 0, channels, mask_c, C, AXIS))
    scale = _channel_row(chan_ptr, 2, channels, mask_c, C, AXIS)
    g32 = g.to(tl.float32)
    if MASK:
        g32 = tl.where(centred * scale + _channel_row(chan_ptr, 3, channels, mask_c, C, AXIS) > 0, g32, 0.0)
    dz = (g32 * scale - _channel_row(chan_ptr, 4, channels, mask_c, C, AXIS)
          - centred * _channel_row(chan_ptr, 5, channels, mask_c, C, AXIS))
    return tl.where(ok, dz, 0.0).to(g.dtype)


@triton.jit
def _conv_dgrad_kernel(
    g_ptr,  # grad of the output (masked unless MASK_Y), contiguous NHWC (N*OH*OW, C_out)
    y_ptr,  # MASK_Y: the saved output, contiguous NHWC like g; BN_GRAD: z, the BatchNorm's input; else unused
    chan_ptr,  # BN_GRAD: fp32 (6, C_out) channel table (kernels/batch_norm_relu.py); else unused
    w_ptr,  # weight, contiguous (C_out, KH, KW, C_in_g)
    dx_ptr,  # out: grad of the input, contiguous NHWC (N*H*W, C_in)
    ws_ptr,  # fp32 workspace (SPLIT_K, N*H*W, C_in) when SPLIT_K > 1: partial sums
    N, H, W, C_in,
    OH, OW, C_out,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    C_in_g, C_out_g,
    step_h, step_w,  # distance between the taps of one phase: stride / gcd(stride, dilation)
    KH: tl.constexpr, KW: tl.constexpr,
    SPLIT_K: tl.constexpr,  # slices of each phase's K loop (the grid's second axis is groups x phases x SPLIT_K)
    EVEN_K: tl.constexpr,  # C_out_g is a multiple of BLOCK_K: no channel mask in the K loop
    MASK_Y: tl.constexpr,  # g is the raw grad of the output: zero it where y <= 0 as it is loaded
    BN_GRAD: tl.constexpr,  # the operand is the BatchNorm's input gradient, computed from g and z as loaded
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # One GEMM per stride phase (ph, pw): the input pixels with ih % stride_h == ph and iw % stride_w == pw,
    # and only the taps that reach them (as CUTLASS's strided dgrad): no MMA on rows a stride skips.
    phases = stride_h * stride_w
    k_slice = tl.program_id(1) % SPLIT_K
    phase = (tl.program_id(1) // SPLIT_K) % phases
    group = tl.program_id(1) // (SPLIT_K * phases)
    ph = phase // stride_w
    pw = phase % stride_w
    # Rows and columns of this phase (at least 1 for the divisions below: a phase with none has M = 0, so
    # every row is masked and no iteration runs).
    HP = tl.maximum((H - ph + stride_h - 1) // stride_h, 1)
    WP = tl.maximum((W - pw + stride_w - 1) // stride_w, 1)
    M = N * ((H - ph + stride_h - 1) // stride_h) * ((W - pw + stride_w - 1) // stride_w)
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(N * tl.cdiv(H, stride_h) * tl.cdiv(W, stride_w),
                                                            BLOCK_M), tl.cdiv(C_in_g, BLOCK_N), GROUP_M)
    first_h, taps_h = _phase_taps(ph, pad_h, dil_h, stride_h, step_h, KH)
    first_w, taps_w = _phase_taps(pw, pad_w, dil_w, stride_w, step_w, KW)
    # The grid is sized for phase (0, 0), the largest: a tile past this phase's pixels runs no iteration.
    iters = tl.where(pid_m * BLOCK_M < M, taps_h * taps_w * tl.cdiv(C_out_g, BLOCK_K), 0)
    it0, it1 = _k_slice(iters, k_slice, SPLIT_K)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # input pixels of this phase
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # input channels within the group
    mask_m = offs_m < M
    mask_n = offs_n < C_in_g  # (a constant mask here, as the forward's EVEN_N, caps sm_80 at 128 registers: spills)
    r = offs_m % (HP * WP)
    rh = r // WP  # input row ih = ph + rh * stride_h, column iw = pw + rw * stride_w
    rw = r % WP
    g_row = (offs_m // (HP * WP)) * (OH * OW * C_out) + group * C_out_g  # this image's grad, int32

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_blocks = tl.cdiv(C_out_g, BLOCK_K)
    for it in range(it0, it1):
        tap = it // k_blocks
        k0 = (it % k_blocks) * BLOCK_K
        kh = first_h + (tap // taps_w) * step_h
        kw = first_w + (tap % taps_w) * step_w
        # The output pixel that tap (kh, kw) of input pixel (ih, iw) came from: oh = (ih + pad - kh*dil) / stride,
        # an exact division in this phase, = rh + a per-tap scalar (no per-pixel division).
        oh = rh + (ph + pad_h - kh * dil_h) // stride_h
        ow = rw + (pw + pad_w - kw * dil_w) // stride_w
        row_ok = mask_m & (oh >= 0) & (oh < OH) & (ow >= 0) & (ow < OW)
        offs_k = k0 + tl.arange(0, BLOCK_K)  # output channels within the group
        mask_k = _channel_mask(offs_k, C_out_g, EVEN_K, BLOCK_K)
        g_offs = (g_row + (oh * OW + ow) * C_out)[:, None] + offs_k[None, :]
        a = tl.load(g_ptr + g_offs, mask=row_ok[:, None] & mask_k[None, :], other=0.0)
        if BN_GRAD:
            a = _batch_norm_dz(a, y_ptr + g_offs, chan_ptr, group * C_out_g + offs_k, row_ok[:, None],
                               mask_k, C_out, MASK_Y, 1)
        elif MASK_Y:
            y = tl.load(y_ptr + g_offs, mask=row_ok[:, None] & mask_k[None, :], other=0.0)
            a = tl.where(y > 0, a, tl.zeros_like(a))
        b = tl.load(w_ptr + ((group * C_out_g + offs_k) * (KH * KW * C_in_g) + (kh * KW + kw) * C_in_g)[:, None]
                    + offs_n[None, :], mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    pix = ((offs_m // (HP * WP)) * H + ph + rh * stride_h) * W + pw + rw * stride_w
    dx_offs = pix[:, None] * C_in + (group * C_in_g + offs_n)[None, :]
    if SPLIT_K > 1:  # every slice writes all its pixels (zeros where it had no tap): _split_k_sum_kernel adds
        tl.store(ws_ptr + k_slice * (N * H * W * C_in) + dx_offs, acc, mask=mask_m[:, None] & mask_n[None, :])
    else:
        tl.store(dx_ptr + dx_offs, acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _conv_wgrad_kernel(
    g_ptr,  # grad of the output (masked unless MASK_Y), contiguous NHWC (N*OH*OW, C_out)
    y_ptr,  # MASK_Y: the saved output, contiguous NHWC like g; BN_GRAD: z, the BatchNorm's input; else unused
    chan_ptr,  # BN_GRAD: fp32 (6, C_out) channel table (kernels/batch_norm_relu.py); else unused
    x_ptr,  # input, NHWC memory: x[n, h, w, c] at n*sxn + h*sxh + w*sxw + c
    dw_ptr,  # out: fp32 workspace (SPLIT, C_out, KH*KW*C_in_g); slice s holds the sum over its rows
    db_ptr,  # out, BIAS_GRAD: fp32 (SPLIT, C_out), slice s's sum of g over its rows; else unused
    N, H, W, C_in,
    OH, OW, C_out,
    sxn, sxh, sxw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    C_in_g, C_out_g,
    SPLIT,  # number of slices of the reduction over M = N*OH*OW (the grid's second axis)
    KH: tl.constexpr, KW: tl.constexpr,
    FOLD_C: tl.constexpr,  # 0: a tile is one tap's (C_out, C_in) block; C_in_g: one filter row's (C_out, (kw, c))
    MASK_Y: tl.constexpr,  # g is the raw grad of the output: zero it where y <= 0 as it is loaded
    BN_GRAD: tl.constexpr,  # the operand is the BatchNorm's input gradient, computed from g and z as loaded
    BIAS_GRAD: tl.constexpr,  # the first tap's first column block also sums its g tiles into db
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    group = tl.program_id(2)
    split = tl.program_id(1)
    # N: the input channels of one tap, or the (kw, c) pairs of one filter row when folded.
    cols = KW * FOLD_C if FOLD_C > 0 else C_in_g
    tiles_m = tl.cdiv(C_out_g, BLOCK_M)
    tiles_n = tl.cdiv(cols, BLOCK_N)
    pid = tl.program_id(0)
    tap = pid // (tiles_m * tiles_n)  # (kh, kw), or kh when folded
    pid_m, pid_n = _grouped_tile(pid % (tiles_m * tiles_n), tiles_m, tiles_n, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # output channels within the group
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # input channels (or (kw, c) pairs) within the group
    mask_m = offs_m < C_out_g
    mask_n = offs_n < cols
    if FOLD_C > 0:
        kh = tap
        col_dw = (offs_n // FOLD_C) * dil_w  # per column: its tap's column offset, and its address offset
        col_off = col_dw * sxw + offs_n % FOLD_C
    else:
        kh = tap // KW
        kw_dw = (tap % KW) * dil_w
    M = N * OH * OW
    rows = tl.cdiv(tl.cdiv(M, SPLIT), BLOCK_K) * BLOCK_K
    start = split * rows
    end = tl.minimum(start + rows, M)

    # Every (split, group, channel block) has exactly one such CTA, and its g tiles cover all of its rows.
    sums_bias = (tap == 0) & (pid_n == 0)
    # Their row sums as one more, narrow MMA (g tile @ a column of ones: column 0 of 16, the rest zeros, so
    # the sum over columns below is exact) rather than a cross-thread reduction per K iteration. fp32 g goes
    # through tf32x3 there: no rounding of g to tf32 in the bias gradient.
    db = tl.zeros((BLOCK_M, 16), dtype=tl.float32)
    ones = ((tl.arange(0, BLOCK_K)[:, None] * 0 + tl.arange(0, 16)[None, :]) == 0).to(x_ptr.dtype.element_ty)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(start, end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # output pixels
        mask_k = offs_k < end
        n_idx = offs_k // (OH * OW)
        hw = offs_k % (OH * OW)
        ih = (hw // OW) * stride_h - pad_h + kh * dil_h
        iw0 = (hw % OW) * stride_w - pad_w
        h_ok = mask_k & (ih >= 0) & (ih < H)
        if FOLD_C > 0:
            iw = iw0[:, None] + col_dw[None, :]
            b_ok = h_ok[:, None] & (iw >= 0) & (iw < W) & mask_n[None, :]
            b_ptrs = x_ptr + (n_idx * sxn + ih * sxh + iw0 * sxw + group * C_in_g)[:, None] + col_off[None, :]
        else:
            iw = iw0 + kw_dw
            b_ok = (h_ok & (iw >= 0) & (iw < W))[:, None] & mask_n[None, :]
            b_ptrs = x_ptr + (n_idx * sxn + ih * sxh + iw * sxw + group * C_in_g)[:, None] + offs_n[None, :]
        g_offs = offs_k[None, :] * C_out + (group * C_out_g + offs_m)[:, None]
        a = tl.load(g_ptr + g_offs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if BN_GRAD:
            a = _batch_norm_dz(a, y_ptr + g_offs, chan_ptr, group * C_out_g + offs_m, mask_k[None, :], mask_m,
                               C_out, MASK_Y, 0)
        elif MASK_Y:
            y = tl.load(y_ptr + g_offs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            a = tl.where(y > 0, a, tl.zeros_like(a))
        if BIAS_GRAD:
            if sums_bias:
                db = tl.dot(a, ones, db, input_precision="tf32x3" if INPUT_PRECISION == "tf32" else "ieee")
        b = tl.load(b_ptrs, mask=b_ok, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    k_total = KH * KW * C_in_g
    # Tap (kh, kw) starts at (kh * KW + kw) * C_in_g, a folded filter row kh at kh * KW * C_in_g: tap * cols.
    dw_offs = (split * C_out + group * C_out_g + offs_m)[:, None] * k_total + tap * cols + offs_n[None, :]
    tl.store(dw_ptr + dw_offs, acc, mask=mask_m[:, None] & mask_n[None, :])
    if BIAS_GRAD:
        if sums_bias:
            tl.store(db_ptr + split * C_out + group * C_out_g + offs_m, tl.sum(db, axis=1), mask=mask_m)


def _autotuned(kernel, configs, variants=()):
    """``variants``: constexprs that change the kernel's loop (the ReLU mask, the BatchNorm's dz), keyed too, so
    that a variant is tuned on its own rather than given the winner of another."""
    return triton.autotune(configs=configs, key=_SHAPE_KEY + list(variants))(kernel)


_FWD = {16: _autotuned(_conv_bias_relu_fwd_kernel, FWD_CONFIGS_16),
        32: _autotuned(_conv_bias_relu_fwd_kernel, FWD_CONFIGS_32)}
_FWD_RESIDUAL = {16: _autotuned(_conv_bias_relu_fwd_kernel, FWD_RESIDUAL_CONFIGS_16),
                 32: _autotuned(_conv_bias_relu_fwd_kernel, FWD_RESIDUAL_CONFIGS_32)}
_GEMM_VARIANTS = ("MASK_Y", "BN_GRAD")
_DGRAD = {16: _autotuned(_conv_dgrad_kernel, DGRAD_CONFIGS_16, _GEMM_VARIANTS),
          32: _autotuned(_conv_dgrad_kernel, DGRAD_CONFIGS_32, _GEMM_VARIANTS)}
_WGRAD = {16: _autotuned(_conv_wgrad_kernel, WGRAD_CONFIGS_16, _GEMM_VARIANTS),
          32: _autotuned(_conv_wgrad_kernel, WGRAD_CONFIGS_32, _GEMM_VARIANTS)}


def _bits(dtype):
    return 32 if dtype.itemsize == 4 else 16


def conv_bias_relu_fwd_autotuned(dtype, residual: bool = False):
    """The forward kernel autotuned over the config list for ``dtype``'s width (a torch dtype), with a residual
    over its own list."""
    return (_FWD_RESIDUAL if residual else _FWD)[_bits(dtype)]


def conv_dgrad_autotuned(dtype):
    """The dgrad kernel autotuned over the config list for ``dtype``'s width."""
    return _DGRAD[_bits(dtype)]


def conv_wgrad_autotuned(dtype):
    """The wgrad kernel autotuned over the config list for ``dtype``'s width."""
    return _WGRAD[_bits(dtype)]
