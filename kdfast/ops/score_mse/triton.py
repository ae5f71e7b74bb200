"""TinyBERT score MSE on materialised [B, H, L, L] maps in Triton: one program per score row.

For row r = (b, h, i) of the student / teacher score maps s, t, with an optional [B, L] token
mask m and the additive-mask threshold theta, an element j is counted when

    s_j > theta  and  t_j > theta  and  (no mask  or  m[b, i] != 0 and m[b, j] != 0)

1. ``_score_mse_fwd_kernel`` reads the row once (in BLOCK_L chunks) and writes the row's
   sum_j counted (s_j - t_j)^2 (fp32) and its number of counted elements (int32; the total is
   summed in int64 on the host side, B H L^2 easily exceeds fp32's exact integers).
2. ``_score_mse_bwd_kernel`` reads the row again and writes d loss / d s_j = coef 2 (s_j - t_j)
   on counted elements, 0 elsewhere, with coef = upstream gradient / total count read from a
   one-element tensor (so torch.compile can trace it without a host sync).

Nothing is stored between the two but the inputs themselves: the gradient is recomputed in
backward instead of being kept from forward (the count, and so the scale, is only known once
the whole map has been read). Traffic: 2 reads of s and t, 1 write of the gradient. Loads are
widened to fp32 at once (the interpreter's bf16 arithmetic is wrong otherwise).
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl


@triton.jit
def _counted(s_ptr, t_ptr, mask_ptr, row, b, q_on, start, offs, L, lo, hi, threshold, HAS_MASK: tl.constexpr):
    cols = start + offs
    inb = (cols >= lo) & (cols < hi)
    s = tl.load(s_ptr + row * L + cols, mask=inb, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + row * L + cols, mask=inb, other=0.0).to(tl.float32)
    on = inb & (s > threshold) & (t > threshold)
    if HAS_MASK:
        on = on & (tl.load(mask_ptr + b * L + cols, mask=inb, other=0) != 0) & q_on
    return cols, inb, on, tl.where(on, s - t, 0.0)


@triton.jit
def _band(row, L, window):
    """[lo, hi): the columns of the row's band |i - j| <= window (the whole row for window < 0)."""
    i = row % L
    lo = tl.where(window >= 0, tl.maximum(i - window, 0), 0)
    hi = tl.where(window >= 0, tl.minimum(i + window + 1, L), L)
    return lo, hi


@triton.jit
def _score_mse_fwd_kernel(s_ptr, t_ptr, mask_ptr, sum_ptr, cnt_ptr, L, HL, threshold, window,
                          HAS_MASK: tl.constexpr, BLOCK_L: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = row // HL
    lo, hi = _band(row, L, window)
    q_on = True
    if HAS_MASK:
        q_on = tl.load(mask_ptr + b * L + row % L) != 0
    offs = tl.arange(0, BLOCK_L)
    acc = tl.zeros([BLOCK_L], tl.float32)
    cnt = tl.zeros([BLOCK_L], tl.int32)
    for start in range(lo // BLOCK_L * BLOCK_L, hi, BLOCK_L):  # the band's blocks only
        cols, inb, on, d = _counted(s_ptr, t_ptr, mask_ptr, row, b, q_on, start, offs, L, lo, hi, threshold,
                                    HAS_MASK)
        acc += d * d
        cnt += on.to(tl.int32)
    tl.store(sum_ptr + row, tl.sum(acc, axis=0))
    tl.store(cnt_ptr + row, tl.sum(cnt, axis=0))


@triton.jit
def _score_mse_bwd_kernel(s_ptr, t_ptr, mask_ptr, coef_ptr, g_ptr, L, HL, threshold, window,
                          HAS_MASK: tl.constexpr, BLOCK_L: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = row // HL
    lo, hi = _band(row, L, window)
    q_on = True
    if HAS_MASK:
        q_on = tl.load(mask_ptr + b * L + row % L) != 0
    coef = 2.0 * tl.load(coef_ptr).to(tl.float32)
    offs = tl.arange(0, BLOCK_L)
    for start in range(0, L, BLOCK_L):  # outside the band: zeros written, nothing read
        cols, inb, on, d = _counted(s_ptr, t_ptr, mask_ptr, row, b, q_on, start, offs, L, lo, hi, threshold,
                                    HAS_MASK)
        tl.store(g_ptr + row * L + cols, (coef * d).to(g_ptr.dtype.element_ty), mask=cols < L)


MAX_BLOCK_GPU = 4096
MAX_BLOCK_INTERPRETER = 16384


def _num_warps(block: int) -> int:
    return 8 if block >= 2048 else 4


def _row_block(L: int, window: int) -> int:
    """The columns one forward program reads: the band's 2 w + 1 (up to two blocks) or the row."""
    return L if window < 0 else min(L, 2 * window + 1)


def _launch_meta(L: int, cuda: bool, has_mask: bool) -> dict:
    block = min(triton.next_power_of_2(L), MAX_BLOCK_GPU if cuda else MAX_BLOCK_INTERPRETER)
    return dict(HAS_MASK=has_mask, BLOCK_L=block, num_warps=_num_warps(block))


def score_mse_fwd_triton(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, threshold: float,
                         has_mask: bool, window: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Row sums of counted squared differences (fp32) and row counts (int32), [B*H*L] each.

    ``s``, ``t`` contiguous [B, H, L, L]; ``mask`` [B, L] int8 (ignored unless ``has_mask``)."""
    B, H, L, _ = s.shape
    sums = torch.empty(B * H * L, dtype=torch.float32, device=s.device)
    counts = torch.empty(B * H * L, dtype=torch.int32, device=s.device)
    _score_mse_fwd_kernel[(B * H * L,)](s, t, mask, sums, counts, L, H * L, float(threshold), int(window),
                                        **_launch_meta(_row_block(L, window), s.is_cuda, has_mask))
    return sums, counts


def score_mse_bwd_triton(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, coef: torch.Tensor,
                         threshold: float, has_mask: bool, window: int = -1) -> torch.Tensor:
    """d loss / d s = coef * 2 (s - t) on counted elements (``coef``: one-element fp32 tensor)."""
    B, H, L, _ = s.shape
    g = torch.empty_like(s)
    _score_mse_bwd_kernel[(B * H * L,)](s, t, mask, coef, g, L, H * L, float(threshold), int(window),
                                        **_launch_meta(L, s.is_cuda, has_mask))
    return g


def aot_configs():
    """Both kernels x dtype x mask, at the block of L = 512, the largest block at 4 warps and the chunked
    block (for kdfast.ops.aot)."""
    for fn, dtype, has_mask, block in itertools.product(
        (_score_mse_fwd_kernel, _score_mse_bwd_kernel), ("fp32", "fp16", "bf16"), (False, True),
        (512, 1024, MAX_BLOCK_GPU)
    ):
        signature = {"s_ptr": f"*{dtype}", "t_ptr": f"*{dtype}", "mask_ptr": "*i8"}
        if fn is _score_mse_fwd_kernel:
            signature.update({"sum_ptr": "*fp32", "cnt_ptr": "*i32"})
        else:
            signature.update({"coef_ptr": "*fp32", "g_ptr": f"*{dtype}"})
        signature.update({"L": "i32", "HL": "i32", "threshold": "fp32", "window": "i32"})
        yield fn, signature, {"HAS_MASK": has_mask, "BLOCK_L": block}, _num_warps(block)


AOT_CONFIGS = aot_configs
