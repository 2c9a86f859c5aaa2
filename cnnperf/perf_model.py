"""A static performance model of the conv kernels: what each pass of a layer costs on a GPU, without one.

Pure arithmetic on the layer's shape, a kernel config and the target GPU's published (or measured) rates;
`cnnperf audit --model` adds what only the compiled SASS can tell (registers, shared memory, instructions in
the K loop) and writes the result per layer and pass. The launchers use the same model to pick a config per
shape (:func:`choose_config`), so the audit predicts exactly what would run.

Passes and their kernels (what ``cnnperf/ops/conv_bias_relu.py`` launches):

- ``fwd``: one implicit GEMM, M = N*OH*OW output pixels, N = C_out/g, K = KH*KW*C_in/g.
- ``mask``: g = dY * (Y > 0) and the bias gradient's partial sums (memory-bound: reads dY and Y, writes g),
  then the partials' sum. Only where the GEMMs do not apply the mask themselves (``mask_y``: dgrad and wgrad
  read dY and Y and mask as they load, the wgrad sums the bias gradient), which :func:`choose_backward`
  decides per shape.
- ``dgrad``: one implicit GEMM per stride phase (ph, pw) of the input: M = the input pixels of that phase, K =
  (the taps that reach that phase) * C_out/g. Each tap of a phase is valid for all its pixels (but the
  borders), so no MMA is spent on rows that a stride skips.
- ``wgrad``: one GEMM per tap, M = C_out/g, N = C_in/g, K = N*OH*OW output pixels, cut into ``split`` slices
  written to an fp32 workspace, then one pass adds them in order (deterministic) and writes the gradient in
  the weight's dtype and layout.
- fwd and dgrad may cut their K loop into ``SPLIT_K`` slices (fp32 partials, then one pass that adds them in
  order, with the forward's bias and ReLU) when their grid is too small for the GPU.
- With at most ``FOLD_MAX_CHANNELS`` input channels per group (a stem), fwd's K and wgrad's N run over the
  (kw, c) pairs of a filter row instead of one tap's channels.

**The model** (a roofline with waves; every constant below is named with where it comes from):

- ``ctas_per_sm`` = min over registers (64 K a SM), shared memory (228 KB a SM, 1 KB reserved per CTA),
  threads (2048) and the 32-CTA limit; from the compiled kernel when known, else from the tile size.
- One K iteration of one CTA costs max(mma, issue, feed) SM clocks: ``mma`` = BM*BN*BK / the SM's tensor-core
  MACs per clock; ``issue`` = num_warps * (SASS instructions in the K loop) / 4 schedulers, known only from the
  compiled kernel (the config pick leaves it out); ``feed`` = the tile's operand bytes / the L2 bandwidth a SM
  gets (Triton's non-TMA loads fetch every operand tile from L2).
- The busiest SM runs ceil(ctas / SMs) CTAs of the grid's average length, ``ctas_per_sm`` at a time sharing
  its tensor cores (so waves come in whole numbers); each round of co-resident CTAs adds ``TILE_OVERHEAD_CLK``
  (pipeline fill and epilogue). That is the compute time; the memory time is ``hbm_bytes`` / the HBM
  bandwidth, or the busy SMs' share of it when the grid is smaller than the GPU (``SM_HBM_SHARE``); a kernel
  takes the larger of the two, plus ``LAUNCH_S``.
- ``hbm_bytes`` counts each tensor a kernel reads or writes once (operand re-reads hit L2);
  ``min_hbm_bytes`` is what the pass would move if it read each operand once and wrote each result once in
  its final dtype: dgrad dY, Y (the ReLU mask), W and dX; wgrad dY, Y, X, dW and db; fwd X, W, b and Y; mask 0
  (a pass that need not exist).
- ``useful_mma_fraction`` = the convolution's MACs / the MACs the grid issues (whole tiles, padded K).
- ``predicted_fraction_of_peak`` = FLOPs / (time * dense tensor-core peak).

What the model leaves out (to be calibrated against ``bench/results/`` when a GPU runs ``gpu_check.sh``):
latency that too few warps cannot hide, L2 misses of operand re-reads, bank conflicts, clock throttling.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Mapping, Sequence

PASSES = ("fwd", "mask", "dgrad", "wgrad")

# The oldest architecture whose dgrad/wgrad may apply the ReLU mask in their K loop instead of a mask pass.
# Measured with `cnnperf audit` (SASS of the K loop, bf16, 128x128x64 w8): sm_90 compares bf16 pairs
# (HSETP2.BF16) and the mask adds 37% to the dgrad's loop (279 -> 382 instructions) and 25% to the wgrad's
# with its bias MMA (354 -> 443); sm_80 has no packed bf16 compare, converts every element to fp32 and the
# loops triple (dgrad 306 -> 934, wgrad 394 -> 1183): there the issue slots cost more than the pass saves.
MASK_IN_GEMMS_MIN_ARCH = 90
# FusedConv2dBatchNormReLU's backward GEMMs may compute the BatchNorm's input gradient dz as they load grad_out and
# z (``bn_dz``) instead of reading a dz that one more pass wrote. Measured with `cnnperf audit` (sm_90, bf16,
# triton 3.8, the 8 dgrad and 8 wgrad configs, 3x3): the fp32 arithmetic adds 13.7-16.0 SASS instructions to the
# K loop per operand element a thread loads (dgrad 128x128x64 w8: 279 -> 732; wgrad: 354 -> 796), 2.2-4.1
# registers per such element (69-131 in all; 4 of the 16 configs spill), and one more A tile of shared memory
# per stage. The config pick has no compiled kernel: it gives such a loop BN_DZ_BASE_INSTRUCTIONS (the plain
# loops' median, 225-653) plus the per-element cost, and counts the issue slots that pick otherwise leaves out.
BN_DZ_INSTRUCTIONS_PER_ELEMENT = 15
BN_DZ_BASE_INSTRUCTIONS = 280
BN_DZ_REGISTERS_PER_ELEMENT = 4
# From sm_90 on (the H200's figures, which the launchers use for newer GPUs too): under triton 3.6 the fp32
# dgrad at 64x64x32 w8 spills on sm_80 (`cnnperf audit`), and the model's gains are a few per cent of a block's
# backward, too little to risk on an architecture no GPU has run.
BN_DZ_MIN_ARCH = 90

# Per-CTA cost of a round of tiles on a SM, in SM clocks: the pipeline's first loads (one DRAM latency, about
# 600-800 clocks on H100 per published microbenchmarks) plus the epilogue's stores.
TILE_OVERHEAD_CLK = 1500
# Gap between back-to-back kernels on one stream, eager launches (no CUDA graph).
LAUNCH_S = 2e-6
# A SM moves at most this many times its fair share of HBM bandwidth: half the SMs saturate it (an
# assumption, to calibrate; a grid of 24 CTAs cannot stream at 4.3 TB/s).
SM_HBM_SHARE = 2.0
# wgrad: the slice counts of the reduction the model weighs (wgrad_split), each slice at least this many K
# iterations (the loads are pipelined 3-5 deep), and the fp32 workspace at most this many bytes.
WGRAD_MAX_ROUNDS = 16  # splits weighed: those filling 1..16 CTAs per SM, 1, and the largest allowed
WGRAD_MIN_ITERS = 4
WGRAD_WORKSPACE_CAP = 256 << 20


@dataclasses.dataclass(frozen=True)
class GPU:
    """What the model needs of a GPU. Rates are per SM and per SM clock."""
    name: str
    arch: int  # compute capability, 80 or 90
    sms: int
    clock_hz: float  # the clock at which the vendor's dense tensor peak is quoted
    macs_per_clk: Mapping[str, int]  # operand kind ("16", "tf32") -> tensor-core MACs per clock per SM
    l2_bytes_per_clk: float  # L2 -> SM bandwidth a SM gets when all load at once
    hbm_bytes_per_s: float
    regs_per_sm: int = 65536
    smem_per_block: int = 227 * 1024  # the most one CTA may take (the device's shared_memory_per_block_optin)
    smem_per_sm: int = 228 * 1024
    smem_reserved_per_cta: int = 1024
    threads_per_sm: int = 2048
    ctas_per_sm_max: int = 32

    def peak_flops(self, operands: str) -> float:
        return 2 * self.macs_per_clk[operands] * self.sms * self.clock_hz


# H100/H200 SXM: 989 dense bf16 TFLOP/s = 2 * 2048 MACs * 132 SMs * 1.83 GHz (wgmma; the same SM's mma.sync
# path is taken at half that rate, an assumption); L2: about 40 B/clk a SM (~9.7 TB/s in all, published
# microbenchmarks measure 7-10 TB/s); HBM: 4.3 TB/s, measured on the H200 here (copy, read + write), the
# H200's nominal 4.8 TB/s less the usual ~10 %.
H200 = GPU("H200 (sm_90)", 90, 132, 1.83e9, {"16": 2048, "tf32": 1024, "16_mma_sync": 1024, "tf32_mma_sync": 512},
           40.0, 4.3e12)
# A100 SXM: 312 dense TFLOP/s = 2 * 1024 * 108 * 1.41 GHz; L2 5120 B/clk in all (NVIDIA's A100 whitepaper);
# HBM2e 2.0 TB/s nominal, ~1.8 effective.
A100 = GPU("A100 (sm_80)", 80, 108, 1.41e9, {"16": 1024, "tf32": 512, "16_mma_sync": 1024, "tf32_mma_sync": 512},
           5120 / 108, 1.8e12, smem_per_block=163 * 1024, smem_per_sm=164 * 1024)
GPUS = {90: H200, 80: A100}


def output_hw(hw, khw, stride, padding, dilation) -> tuple[int, int]:
    """(OH, OW) of a convolution of an (H, W) image ``hw`` with a (KH, KW) filter ``khw``."""
    return tuple((x + 2 * p - d * (k - 1) - 1) // s + 1
                 for x, k, s, p, d in zip(hw, khw, stride, padding, dilation))


@dataclasses.dataclass(frozen=True)
class Conv:
    """A convolution problem: ints only (``stride``/``padding``/``dilation`` are pairs); ``itemsize`` of the
    activations and weights (2 or 4); ``has_bias``. (:class:`cnnperf.conv_shapes.ConvShape` adds a layer's
    name.)"""
    n: int
    c_in: int
    h: int
    w: int
    c_out: int
    kh: int
    kw: int
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    itemsize: int = 2
    has_bias: bool = True

    @classmethod
    def of(cls, shape: Any, itemsize: int = 2, has_bias: bool = True) -> "Conv":
        """The problem of anything with the fields (a :class:`cnnperf.conv_shapes.ConvShape`, whose name and
        count are dropped), in ``itemsize`` and with or without bias."""
        names = [f.name for f in dataclasses.fields(cls) if f.name not in ("itemsize", "has_bias")]
        return cls(**{k: (tuple(getattr(shape, k)) if k in ("stride", "padding", "dilation") else getattr(shape, k))
                      for k in names}, itemsize=itemsize, has_bias=has_bias)

    @property
    def output_hw(self) -> tuple[int, int]:
        return output_hw((self.h, self.w), (self.kh, self.kw), self.stride, self.padding, self.dilation)

    @property
    def oh(self) -> int:
        return self.output_hw[0]

    @property
    def ow(self) -> int:
        return self.output_hw[1]

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (self.n, self.c_in, self.h, self.w)

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.c_out, self.c_in_g, self.kh, self.kw)

    @property
    def c_in_g(self) -> int:
        return self.c_in // self.groups

    @property
    def c_out_g(self) -> int:
        return self.c_out // self.groups

    @property
    def aligned(self) -> bool:
        """Channel counts (hence NHWC strides) multiples of 16: Triton's vectorised, pipelined loads."""
        return self.c_in_g % 16 == 0 and self.c_out_g % 16 == 0 and self.c_in % 16 == 0

    @property
    def macs(self) -> int:
        return self.n * self.oh * self.ow * self.c_out * self.c_in_g * self.kh * self.kw

    @property
    def flops(self) -> int:
        return 2 * self.macs

    def sizes(self) -> dict[str, int]:
        """Bytes of each tensor in its own dtype: x, w, b, y (= dy = g)."""
        e = self.itemsize
        return {"x": self.n * self.c_in * self.h * self.w * e,
                "w": self.c_out * self.c_in_g * self.kh * self.kw * e,
                "b": self.c_out * e if self.has_bias else 0,
                "y": self.n * self.c_out * self.oh * self.ow * e}


FOLD_MAX_CHANNELS = 15  # up to this many input channels per group, fwd and wgrad fold (kw, c) into one block


def fold_channels(c_in_g: int) -> int:
    """The kernels' ``FOLD_C``: ``c_in_g`` when it is small enough that a tap's channels would leave most of a
    K (fwd) or N (wgrad) block empty (an RGB stem: 3 of 32), else 0."""
    return c_in_g if c_in_g <= FOLD_MAX_CHANNELS else 0


# ---------------------------------------------------------------------------------------------------------
# Stride phases of dgrad: which taps reach which input pixels.
# ---------------------------------------------------------------------------------------------------------

def phase_taps(k: int, stride: int, pad: int, dil: int, phase: int) -> tuple[int, int]:
    """(first tap, number of taps) along one axis for input rows ``i`` with ``i % stride == phase``: tap ``t``
    reaches such a row iff (phase + pad - t*dil) % stride == 0; those taps are first + j*step, j < count, with
    step = stride / gcd(stride, dil)."""
    step = stride // math.gcd(stride, dil)
    first = next((t for t in range(min(k, step)) if (phase + pad - t * dil) % stride == 0), None)
    if first is None:
        return 0, 0
    return first, (k - first + step - 1) // step


def phase_rows(size: int, stride: int, phase: int) -> int:
    """How many of ``size`` rows have ``row % stride == phase``."""
    return max(0, (size - phase + stride - 1) // stride)


# ---------------------------------------------------------------------------------------------------------
# The GEMM each pass runs, per config.
# ---------------------------------------------------------------------------------------------------------

def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclasses.dataclass(frozen=True)
class Grid:
    """The launch of one GEMM kernel: CTAs, and the K iterations of each (longest first, one entry per CTA
    class with its count)."""
    ctas: int
    k_iters: tuple[tuple[int, int], ...]  # ((iterations, number of CTAs), ...)
    issued_macs: int


def _k_slices(iters: int, split_k: int) -> list[int]:
    """The iterations of each K slice (the kernels' _k_slice: equal slices, the last shorter, some maybe 0)."""
    per = _cdiv(iters, split_k)
    return [max(0, min(per, iters - k * per)) for k in range(split_k)]


def gemm_grid(kind: str, conv: Conv, cfg: Mapping[str, int], split: int = 1) -> Grid:
    """The grid that ``kind`` ("fwd", "dgrad", "wgrad") launches for ``conv`` with tile config ``cfg``: wgrad's
    ``split`` slices of the pixels; fwd's and dgrad's ``cfg["SPLIT_K"]`` slices of the K loop."""
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    split_k = cfg.get("SPLIT_K", 1)
    g = conv.groups
    fold = fold_channels(conv.c_in_g)
    if kind == "fwd":
        tiles = _cdiv(conv.n * conv.oh * conv.ow, bm) * _cdiv(conv.c_out_g, bn) * g
        if fold:
            iters = conv.kh * _cdiv(conv.kw * fold, bk)
        else:
            iters = conv.kh * conv.kw * _cdiv(conv.c_in_g, bk)
        classes = _merge((i, tiles) for i in _k_slices(iters, split_k))
    elif kind == "dgrad":  # one GEMM per stride phase, over the taps that reach it
        counts: dict[int, int] = {}
        cols = _cdiv(conv.c_in_g, bn) * g
        # Every phase gets the row tiles of phase (0, 0), the largest; those past a smaller phase run no iteration.
        launched = _cdiv(conv.n * _cdiv(conv.h, conv.stride[0]) * _cdiv(conv.w, conv.stride[1]), bm)
        for ph in range(conv.stride[0]):
            _, taps_h = phase_taps(conv.kh, conv.stride[0], conv.padding[0], conv.dilation[0], ph)
            for pw in range(conv.stride[1]):
                _, taps_w = phase_taps(conv.kw, conv.stride[1], conv.padding[1], conv.dilation[1], pw)
                rows = conv.n * phase_rows(conv.h, conv.stride[0], ph) * phase_rows(conv.w, conv.stride[1], pw)
                iters = taps_h * taps_w * _cdiv(conv.c_out_g, bk)
                for i in _k_slices(iters, split_k):
                    counts[i] = counts.get(i, 0) + _cdiv(rows, bm) * cols
                counts[0] = counts.get(0, 0) + (launched - _cdiv(rows, bm)) * cols * split_k
        classes = tuple(sorted(((i, c) for i, c in counts.items() if c), reverse=True))
    elif kind == "wgrad":
        if fold:
            tiles = _cdiv(conv.c_out_g, bm) * _cdiv(conv.kw * fold, bn) * conv.kh * g
        else:
            tiles = _cdiv(conv.c_out_g, bm) * _cdiv(conv.c_in_g, bn) * conv.kh * conv.kw * g
        m = conv.n * conv.oh * conv.ow
        rows = _cdiv(_cdiv(m, split), bk) * bk  # a slice's rows (the kernel's), the last ones shorter or empty
        full = min(split, m // rows)
        rest = m - full * rows
        lengths = [(rows, full), (rest, 1 if rest else 0), (0, split - full - (1 if rest else 0))]
        classes = _merge((_cdiv(length, bk), count * tiles) for length, count in lengths if count)
    else:
        raise ValueError(f"unknown GEMM kind {kind!r}; one of fwd, dgrad, wgrad")
    ctas = sum(c for _, c in classes)
    issued = sum(i * c for i, c in classes) * bm * bn * bk
    return Grid(ctas, classes, issued)


def _merge(pairs) -> tuple[tuple[int, int], ...]:
    counts: dict[int, int] = {}
    for i, c in pairs:
        counts[i] = counts.get(i, 0) + c
    return tuple(sorted(counts.items(), reverse=True))


def wgrad_split(conv: Conv, cfg: Mapping[str, int], gpu: GPU, mask_y: bool = False) -> int:
    """Slices of the wgrad reduction for ``cfg``: of the candidates, the one the model predicts fastest
    (the GEMM with the tile's estimated occupancy, as the launcher has no compiled kernel at hand, plus the
    workspace's sum), each slice at least ``WGRAD_MIN_ITERS`` K iterations, the fp32 workspace at most
    ``WGRAD_WORKSPACE_CAP`` bytes. More slices fill more SMs; each costs a tile's overhead and workspace
    traffic: the model weighs the two rather than a fixed wave count."""
    m = conv.n * conv.oh * conv.ow
    w32 = 4 * conv.c_out * conv.c_in_g * conv.kh * conv.kw
    largest = max(1, min(m // (WGRAD_MIN_ITERS * cfg["BLOCK_K"]), WGRAD_WORKSPACE_CAP // max(1, w32)))
    # The busiest SM's time goes as ceil(tiles * split / SMs) / split: the best splits fill whole rounds.
    tiles = gemm_grid("wgrad", conv, cfg, 1).ctas
    fills = {max(1, min(largest, rounds * gpu.sms // tiles)) for rounds in range(1, WGRAD_MAX_ROUNDS + 1)}
    best, best_t = 1, math.inf
    for split in sorted(fills | {1, largest}):
        t = sum(k.seconds for k in gemm_pass("wgrad", conv, cfg, gpu, split=split, mask_y=mask_y))
        if t < best_t:
            best, best_t = split, t
    return best


# ---------------------------------------------------------------------------------------------------------
# Occupancy, time, and the config pick.
# ---------------------------------------------------------------------------------------------------------

def smem_estimate(cfg: Mapping[str, int], itemsize: int, arch: int = 90, kind: str = "fwd",
                  mask_y: bool = False, bn_dz: bool = False) -> int:
    """Shared memory of a pipelined GEMM tile when the compiled kernel is not at hand, as Triton allocates it
    (exact on every conv config the model audits pick, triton 3.8): on sm_90 the A and B tiles of every stage
    plus 1 KB of barriers, on sm_80 of every stage but one; a backward GEMM that applies the ReLU mask
    (``mask_y``) holds Y's A tiles too, of every stage but two (+2 KB for the wgrad's bias sum); one that
    computes the BatchNorm's dz (``bn_dz``) z's A tiles of every stage (+2.5 KB; within 2 KB on sm_90's 16
    configs)."""
    tile = (cfg["BLOCK_M"] + cfg["BLOCK_N"]) * cfg["BLOCK_K"] * itemsize
    stages = cfg.get("num_stages", 3)
    smem = stages * tile + 1024 if arch >= 90 else max(1, stages - 1) * tile
    if bn_dz:
        smem += stages * cfg["BLOCK_M"] * cfg["BLOCK_K"] * itemsize + 2560
    elif mask_y:
        smem += max(0, stages - 2) * cfg["BLOCK_M"] * cfg["BLOCK_K"] * itemsize + (2048 if kind == "wgrad" else 0)
    return smem


# The estimate's error on the configs audited is within ~25 registers: a config estimated within this of the
# 255 cap may spill (the sm_80 forward of an RGB stem at 128x64x64 w4: estimated 248, spilled 40 B).
SPILL_MARGIN = 32


def registers_estimate(cfg: Mapping[str, int], aligned: bool = True, arch: int = 90, kind: str = "fwd",
                       mask_y: bool = False, bn_dz: bool = False) -> int:
    """Registers a thread when the compiled kernel is not at hand, fitted to `cnnperf audit --model` (ResNet-50,
    VGG-16, triton 3.8; within ~25 of the compiled figure on the configs picked): with acc = the fp32
    accumulator's registers a thread, acc + 64 on sm_90 (wgmma keeps the accumulator in place: 128x128 w8
    111-122), 2 acc + 56 on sm_80 (mma.sync: 128x128 w8 185-189); 64 more for a forward whose channels are not
    multiples of 16 (unvectorised loads and per-element masks: 167 for the folded stem at 64x64 w4); 48 more
    for a backward GEMM that applies the ReLU mask (``mask_y``: the Y tile and the select; dgrad 128x128 w8
    123 -> 158, wgrad with the bias MMA 119 -> 170, dgrad 64x64 w4 89 -> 130); ``BN_DZ_REGISTERS_PER_ELEMENT``
    more per A-tile element a thread loads for one that computes the BatchNorm's dz (``bn_dz``). Over 255 means
    a spill."""
    acc = cfg["BLOCK_M"] * cfg["BLOCK_N"] // (32 * cfg.get("num_warps", 4))
    regs = acc + 64 if arch >= 90 else 2 * acc + 56
    if bn_dz:
        regs += BN_DZ_REGISTERS_PER_ELEMENT * cfg["BLOCK_M"] * cfg["BLOCK_K"] // (32 * cfg.get("num_warps", 4))
    elif mask_y:
        regs += 48
    return regs + (64 if kind == "fwd" and not aligned else 0)


def ctas_per_sm(gpu: GPU, num_warps: int, registers: int, shared_bytes: int) -> int:
    threads = 32 * num_warps
    regs = gpu.regs_per_sm // max(1, _round_up(min(registers, 255), 8) * threads)
    smem = gpu.smem_per_sm // max(1, shared_bytes + gpu.smem_reserved_per_cta)
    return max(0, min(regs, smem, gpu.threads_per_sm // threads, gpu.ctas_per_sm_max))


def _round_up(a: int, b: int) -> int:
    return _cdiv(a, b) * b


def operands(itemsize: int, mma: str | None, arch: int) -> str:
    """The tensor-core rate key: 16-bit or tf32 operands, wgmma (sm_90 HGMMA) or mma.sync (HMMA)."""
    kind = "16" if itemsize == 2 else "tf32"
    return kind + ("_mma_sync" if arch >= 90 and mma == "HMMA" else "")


@dataclasses.dataclass
class KernelCost:
    """The model's account of one kernel launch (GEMM or memory-bound)."""
    name: str
    seconds: float
    hbm_bytes: int
    config: str | None = None
    ctas: int | None = None
    ctas_per_sm: int | None = None
    waves: float | None = None
    issued_macs: int = 0
    bound: str = "memory"  # "mma", "issue", "feed", "memory"
    split: int = 1  # wgrad's slices of the reduction


def gemm_cost(name: str, grid: Grid, cfg: Mapping[str, int], itemsize: int, gpu: GPU, hbm_bytes: int,
              *, aligned: bool = True, registers: int | None = None, shared_bytes: int | None = None,
              mainloop_instructions: int | None = None, mma: str | None = None,
              mask_y: bool = False, bn_dz: bool = False) -> KernelCost:
    """Time of one implicit-GEMM launch (see the module docstring); ``mask_y``: a backward GEMM that also loads
    Y's tile beside grad_out's (the ReLU mask): one more A tile to feed from L2 each K iteration; ``bn_dz``:
    one that loads z's tile and computes the BatchNorm's dz from the two, whose issue slots count even without
    a compiled kernel (``BN_DZ_INSTRUCTIONS_PER_ELEMENT``)."""
    warps = cfg.get("num_warps", 4)
    regs = registers if registers is not None else registers_estimate(cfg, aligned, gpu.arch, name, mask_y, bn_dz)
    smem = shared_bytes if shared_bytes is not None else smem_estimate(cfg, itemsize, gpu.arch, name, mask_y,
                                                                       bn_dz)
    occupancy = max(1, ctas_per_sm(gpu, warps, regs, smem))
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    per_iter = {"mma": bm * bn * bk / gpu.macs_per_clk[operands(itemsize, mma, gpu.arch)],
                "feed": ((2 if mask_y or bn_dz else 1) * bm + bn) * bk * itemsize / gpu.l2_bytes_per_clk}
    if mainloop_instructions is None and bn_dz:
        mainloop_instructions = (BN_DZ_BASE_INSTRUCTIONS
                                 + BN_DZ_INSTRUCTIONS_PER_ELEMENT * bm * bk // (32 * warps))
    if mainloop_instructions is not None:
        per_iter["issue"] = warps * mainloop_instructions / 4
    bound = max(per_iter, key=per_iter.get)
    # The busiest SM runs ceil(ctas / SMs) CTAs of the average length (whole waves: the quantization).
    load = _cdiv(grid.ctas, gpu.sms)
    mean_iters = sum(i * c for i, c in grid.k_iters) / max(1, grid.ctas)
    clocks = load * mean_iters * per_iter[bound]
    clocks += _cdiv(load, occupancy) * TILE_OVERHEAD_CLK
    compute = clocks / gpu.clock_hz
    # A grid smaller than the GPU reaches only its SMs' share of HBM bandwidth.
    sms_busy = min(gpu.sms, grid.ctas)
    memory = hbm_bytes / min(gpu.hbm_bytes_per_s, SM_HBM_SHARE * gpu.hbm_bytes_per_s * sms_busy / gpu.sms)
    return KernelCost(name, max(compute, memory) + LAUNCH_S, hbm_bytes, config_label(cfg), grid.ctas, occupancy,
                      grid.ctas / (gpu.sms * occupancy), grid.issued_macs, bound if compute >= memory else "memory")


def memory_cost(name: str, hbm_bytes: int, gpu: GPU) -> KernelCost:
    return KernelCost(name, hbm_bytes / gpu.hbm_bytes_per_s + LAUNCH_S, hbm_bytes)


def config_label(cfg: Mapping[str, int]) -> str:
    """``128x128x64 w8 s3``, with `` k2`` for a K split of 2."""
    split_k = f" k{cfg['SPLIT_K']}" if cfg.get("SPLIT_K", 1) > 1 else ""
    return (f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} w{cfg.get('num_warps', 4)}"
            f" s{cfg.get('num_stages', 3)}{split_k}")


def config_dict(config) -> dict[str, int]:
    """A ``triton.Config`` or a dict of constexprs (with optional num_warps / num_stages) as one flat dict."""
    if isinstance(config, Mapping):
        return dict(config)
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def gemm_bytes(kind: str, conv: Conv, split: int = 1, split_k: int = 1, mask_y: bool = False) -> int:
    """HBM bytes of the GEMM kernel itself: its operands read once, its result written once (to an fp32
    workspace slice each with split-K); ``mask_y``: dgrad and wgrad also read Y (the ReLU mask), the wgrad
    writes the bias gradient's fp32 partials per slice."""
    s = conv.sizes()
    if kind == "fwd":
        out = s["y"] if split_k == 1 else split_k * s["y"] // conv.itemsize * 4
        return s["x"] + s["w"] + s["b"] + out
    y = s["y"] if mask_y else 0
    if kind == "dgrad":
        out = s["x"] if split_k == 1 else split_k * s["x"] // conv.itemsize * 4
        return s["y"] + y + s["w"] + out  # g (or dY and Y), W -> dX
    bias = split * conv.c_out * 4 if mask_y and conv.has_bias else 0
    return s["y"] + y + s["x"] + split * (s["w"] // conv.itemsize) * 4 + bias  # g (or dY, Y), X -> fp32 slices


def choose_config(kind: str, conv: Conv, configs: Iterable, gpu: GPU, mask_y: bool = False,
                  bn_dz: bool = False) -> dict[str, int]:
    """The config of ``configs`` with the least predicted time for ``kind`` on ``conv`` (ties: the first).

    The pick sees shapes only (no compiled kernel): registers and shared memory are estimated, configs whose
    estimate comes within ``SPILL_MARGIN`` of a spill or whose shared memory exceeds the GPU's per-block limit
    are left out (unless all are), and the issue term is left out (but for ``bn_dz``, whose arithmetic is
    estimated: ``BN_DZ_INSTRUCTIONS_PER_ELEMENT``). For fwd and dgrad it also picks
    ``SPLIT_K`` (:func:`split_k_choices`; the key is absent for 1). Deterministic: the same shape always gets
    the same config, with no GPU time spent. ``mask_y``: dgrad or wgrad applying the ReLU mask; ``bn_dz``:
    computing the BatchNorm's dz.
    """
    configs = [config_dict(c) for c in configs]
    fitting = [c for c in configs
               if registers_estimate(c, conv.aligned, gpu.arch, kind, mask_y, bn_dz) <= 255 - SPILL_MARGIN
               and smem_estimate(c, conv.itemsize, gpu.arch, kind, mask_y, bn_dz) <= gpu.smem_per_block]
    best, best_t = None, math.inf
    for cfg in [dict(c, SPLIT_K=k) if k > 1 else c for c in fitting or configs for k in split_k_choices(kind, conv, c)]:
        t = sum(k.seconds for k in gemm_pass(kind, conv, cfg, gpu, mask_y=mask_y, bn_dz=bn_dz))
        if t < best_t:
            best, best_t = cfg, t
    if best is None:
        raise ValueError(f"choose_config: no configs for {kind}")
    return best


SPLIT_K_CHOICES = (1, 2, 3, 4, 6, 8)
SPLIT_K_MIN_ITERS = 4  # K iterations per slice, at least: the loads are pipelined 3-5 stages deep
SPLIT_K_WORKSPACE_CAP = 256 << 20


def split_k_choices(kind: str, conv: Conv, cfg: Mapping[str, int]) -> list[int]:
    """The K splits worth considering for fwd and dgrad with ``cfg``: each slice keeps at least
    ``SPLIT_K_MIN_ITERS`` iterations of the longest K loop and the fp32 workspace stays under its cap."""
    if kind not in ("fwd", "dgrad"):
        return [1]
    longest = max(i for i, _ in gemm_grid(kind, conv, {**cfg, "SPLIT_K": 1}).k_iters)
    out_bytes = 4 * (conv.n * conv.oh * conv.ow * conv.c_out if kind == "fwd" else conv.n * conv.h * conv.w * conv.c_in)
    return [k for k in SPLIT_K_CHOICES
            if k == 1 or (longest >= k * SPLIT_K_MIN_ITERS and k * out_bytes <= SPLIT_K_WORKSPACE_CAP)]


def choose_backward(conv: Conv, dgrad_configs: Iterable, wgrad_configs: Iterable,
                    gpu: GPU) -> tuple[bool, dict[str, dict[str, int]]]:
    """(mask_y, {"dgrad": config, "wgrad": config}): whether the backward GEMMs of ``conv`` apply the ReLU mask
    themselves (reading dY and Y; the wgrad sums the bias gradient) or a mask pass writes g first, whichever
    the model predicts faster with each side's best configs (the fused loads feed one more tile from L2 each K
    iteration; the pass moves 6 bytes an element). Never fused below :data:`MASK_IN_GEMMS_MIN_ARCH`."""
    return _in_gemms_or_pass(conv, dgrad_configs, wgrad_configs, gpu, "mask_y",
                             gpu.arch >= MASK_IN_GEMMS_MIN_ARCH, mask_pass(conv, gpu))


def choose_batch_norm_backward(conv: Conv, dgrad_configs: Iterable, wgrad_configs: Iterable, gpu: GPU,
                               kinds: Sequence[str] = ("dgrad", "wgrad")) -> tuple[bool, dict[str, dict[str, int]]]:
    """(bn_dz, {"dgrad": config, "wgrad": config}) for the backward GEMMs of a FusedConv2dBatchNormReLU's
    ``conv``: whether they compute the BatchNorm's dz as they load grad_out and z (one more tile each, and the
    arithmetic's issue slots) or read a dz that one more pass wrote (3 bytes per element of dz's dtype moved),
    whichever the model predicts faster with each side's best configs, over the GEMMs that run (``kinds``: a
    first layer has no dgrad, a frozen weight no wgrad). Never below :data:`BN_DZ_MIN_ARCH`."""
    return _in_gemms_or_pass(conv, dgrad_configs, wgrad_configs, gpu, "bn_dz", gpu.arch >= BN_DZ_MIN_ARCH,
                             [memory_cost("dz", 3 * conv.sizes()["y"], gpu)], kinds)


def _in_gemms_or_pass(conv: Conv, dgrad_configs: Iterable, wgrad_configs: Iterable, gpu: GPU, flag: str,
                      allowed: bool, pass_kernels: list[KernelCost],
                      kinds: Sequence[str] = ("dgrad", "wgrad")) -> tuple[bool, dict[str, dict[str, int]]]:
    """(in_gemms, configs): the backward GEMMs with ``flag`` (``mask_y`` or ``bn_dz``: they do an elementwise
    pass's work as they load) against the GEMMs without it plus ``pass_kernels``, each side with its best
    configs, timed over ``kinds``; ties and ``allowed`` False keep the pass."""
    configs = {"dgrad": list(dgrad_configs), "wgrad": list(wgrad_configs)}
    best = None
    for in_gemms in (False, True) if allowed else (False,):
        cfgs = {kind: choose_config(kind, conv, lst, gpu, **{flag: in_gemms}) for kind, lst in configs.items()}
        kernels = [k for kind, cfg in cfgs.items() if kind in kinds
                   for k in gemm_pass(kind, conv, cfg, gpu, **{flag: in_gemms})]
        t = sum(k.seconds for k in kernels + ([] if in_gemms else pass_kernels))
        if best is None or t < best[0]:
            best = (t, in_gemms, cfgs)
    return best[1], best[2]


def gemm_pass(kind: str, conv: Conv, cfg: Mapping[str, int], gpu: GPU, split: int | None = None,
              mask_y: bool = False, bn_dz: bool = False, **compiled) -> list[KernelCost]:
    """The kernels of GEMM pass ``kind`` with config ``cfg``: the GEMM and, for wgrad, the workspace's sum
    and cast; ``split``: wgrad's, else :func:`wgrad_split`'s. ``mask_y``: dgrad or wgrad applying the ReLU
    mask (:func:`choose_backward`); ``bn_dz``: computing the BatchNorm's dz from grad_out and z (their bytes
    are Y's and dY's). ``compiled``: registers, shared_bytes, mainloop_instructions, mma of the compiled
    kernel."""
    if split is None:
        split = wgrad_split(conv, cfg, gpu, mask_y or bn_dz) if kind == "wgrad" else 1
    split_k = cfg.get("SPLIT_K", 1)
    grid = gemm_grid(kind, conv, cfg, split)
    kernels = [gemm_cost(kind, grid, cfg, conv.itemsize, gpu,
                         gemm_bytes(kind, conv, split, split_k, mask_y or bn_dz),
                         aligned=conv.aligned, mask_y=mask_y, bn_dz=bn_dz, **compiled)]
    kernels[0].split = split
    if split_k > 1:  # the slices' sum (+ bias and ReLU in the forward)
        out = conv.sizes()["y" if kind == "fwd" else "x"]
        kernels.append(memory_cost("split_k_sum", split_k * out // conv.itemsize * 4 + out, gpu))
    if kind == "wgrad":  # the slices' sum, cast to the weight's dtype and layout in the same pass
        w32 = conv.sizes()["w"] // conv.itemsize * 4
        kernels.append(memory_cost("wgrad_sum", split * w32 + conv.sizes()["w"], gpu))
        if (mask_y or bn_dz) and conv.has_bias:  # the bias gradient's slices summed
            kernels.append(memory_cost("bias_sum", split * conv.c_out * 4 + conv.c_out * 4, gpu))
    return kernels


def mask_pass(conv: Conv, gpu: GPU, block_m: int = 64) -> list[KernelCost]:
    """The ReLU-mask + bias-partials pass and the partials' sum."""
    s = conv.sizes()
    m = conv.n * conv.oh * conv.ow
    partials = _cdiv(m, block_m) * conv.c_out * 4 if conv.has_bias else 0
    kernels = [memory_cost("mask", 3 * s["y"] + partials, gpu)]
    if conv.has_bias:
        kernels.append(memory_cost("bias_sum", partials + conv.c_out * 4, gpu))
    return kernels


def min_hbm_bytes(kind: str, conv: Conv) -> int:
    s = conv.sizes()
    return {"fwd": s["x"] + s["w"] + s["b"] + s["y"],
            "mask": 0,
            "dgrad": 2 * s["y"] + s["w"] + s["x"],
            "wgrad": 2 * s["y"] + s["x"] + s["w"] + s["b"]}[kind]


# Conv -> BatchNorm2d -> ReLU in training: HBM bytes of one step of the block, fused
# (cnnperf/ops/conv_batch_norm_relu.py) and as eager PyTorch runs it (the convolution, BatchNorm's statistics and
# normalisation kernels, the ReLU; backward: the ReLU's, BatchNorm's reduction and elementwise kernels). Both
# count the convolution's three GEMMs at their minimum (each operand read once), so the difference is what the
# fusion changes: the passes over the conv output's size Z (z, the output, its gradient, dz all have it).
BN_PASS_BLOCK_M = 64  # the BatchNorm + ReLU passes' row block (kernels/batch_norm_relu.py CONFIG)


def batch_norm_block_kernels(conv: Conv, fused: bool, residual: bool = False, block_m: int = 128,
                             dz_in_gemms: bool = False) -> list[tuple[str, str, int]]:
    """``(direction, kernel, HBM bytes)`` of one training step of ``conv -> BatchNorm2d -> ReLU`` (with
    ``residual``: ``-> + residual -> ReLU``, a ResNet block's last conv); ``block_m``: the forward's row tile (the
    statistics' tiles); ``dz_in_gemms``: the fused block's dgrad and wgrad compute dz as they load grad_out (or
    g) and z (:func:`choose_batch_norm_backward`) instead of a dz pass. Per-channel fp32 vectors are counted
    where read."""
    s = conv.sizes()
    x, w, b, z = s["x"], s["w"], s["b"], s["y"]
    r = z if residual else 0  # one more pass-sized tensor read (the residual; the output for the mask)
    vector = 4 * conv.c_out
    rows = conv.n * conv.oh * conv.ow
    gemms = [("bwd", "dgrad", z + w + x), ("bwd", "wgrad", z + x + w + b)]
    if fused:
        tiles = 2 * _cdiv(rows, block_m) * vector  # the statistics epilogue's (sum, M2) per row tile
        partials = 2 * _cdiv(rows, BN_PASS_BLOCK_M) * vector  # the gradient sums' per row block
        kernels = [("fwd", "conv + statistics epilogue", x + w + b + z + tiles),
                   # the tiles read once from HBM (the second pass of Chan's formula finds them in L2); gamma,
                   # beta in; mean, var and the six-row channel table out
                   ("fwd", "statistics finalize (tiles -> mean, var, table)", tiles + 10 * vector),
                   ("fwd", "normalise (+ residual) + ReLU", 2 * z + r + 6 * vector),
                   ("bwd", "channel table (mean, var)", 10 * vector),
                   # with a residual the sums pass also reads the output (the mask) and writes g, which the dz
                   # pass reads instead of grad_out
                   ("bwd", "gradient sums (dY, z)", 2 * z + 2 * r + 6 * vector + partials),
                   ("bwd", "gradient coefficients (partials -> b, k, sums)", partials + 6 * vector)]
        if dz_in_gemms:
            return kernels + [("bwd", "dgrad (dY, z -> dz as loaded)", 2 * z + w + x + 6 * vector),
                              ("bwd", "wgrad (dY, z -> dz as loaded)", 2 * z + x + w + b + 6 * vector)]
        return kernels + [("bwd", "dz (dY, z -> dz)", 3 * z + 6 * vector)] + gemms
    kernels = [("fwd", "conv", x + w + b + z), ("fwd", "BN statistics (z)", z + 2 * vector),
               ("fwd", "BN normalise (z -> out)", 2 * z + 4 * vector)]
    if residual:
        kernels.append(("fwd", "add (out, residual -> out)", 3 * z))
    kernels += [("fwd", "ReLU", 2 * z), ("bwd", "ReLU backward (dY, Y -> g)", 3 * z),
                ("bwd", "BN backward sums (g, z)", 2 * z + 4 * vector),
                ("bwd", "BN backward dz (g, z -> dz)", 3 * z + 6 * vector)]
    return kernels + gemms


def pass_row(kind: str, conv: Conv, gpu: GPU, kernels: Sequence[KernelCost]) -> dict[str, Any]:
    """One JSON row of the model: the pass's kernels summed, the GEMM's launch figures."""
    seconds = sum(k.seconds for k in kernels)
    hbm = sum(k.hbm_bytes for k in kernels)
    gemm = next((k for k in kernels if k.config is not None), None)
    flops = conv.flops if kind != "mask" else 0
    row = {"pass": kind, "seconds": seconds, "hbm_bytes": hbm, "min_hbm_bytes": min_hbm_bytes(kind, conv),
           "flops": flops, "kernels": [k.name for k in kernels]}
    if gemm is not None:
        row.update(config=gemm.config, ctas=gemm.ctas, ctas_per_sm=gemm.ctas_per_sm, waves=round(gemm.waves, 3),
                   bound=gemm.bound, useful_mma_fraction=round(conv.macs / gemm.issued_macs, 4),
                   split=gemm.split)
    peak = gpu.peak_flops(operands(conv.itemsize, None, gpu.arch))
    row["predicted_fraction_of_peak"] = round(flops / (seconds * peak), 4) if flops else None
    return row


def weighted_geomean(pairs: Iterable[tuple[float, float]]) -> float | None:
    """exp(sum w ln x / sum w) over (x, w) with x > 0 and w > 0."""
    pairs = [(x, w) for x, w in pairs if x and x > 0 and w > 0]
    if not pairs:
        return None
    return math.exp(sum(w * math.log(x) for x, w in pairs) / sum(w for _, w in pairs))
