"""The ``triton`` backend of :mod:`kdfast.ops.mobilebert_blocks`.

MobileBERT's memory-bound epilogue in Triton: bias + residual + NoNorm, and ReLU backward
fused with its bias gradient.

On rows of width D (x, residual: [N, D], unit column stride; bias, gamma, beta: [D]):

* forward:  y = (x + bias + residual) * gamma + beta  (one read of x and residual, one write);
* backward: dx = dresidual = dy * gamma, dgamma = sum_rows dy * (x + bias + residual),
  dbeta = sum_rows dy, dbias = gamma * dbeta (= sum_rows dy * gamma), in one pass over dy, x
  and residual: the sum x + bias + residual is recomputed, never stored;
* ReLU backward: dh <- dh * (h > 0) in place, dbias = sum_rows dh.

Column sums: each program folds ROWS_PER_PROG rows into fp32 registers and writes one partial
row; the few partial rows are summed by torch afterwards (deterministic, no atomics).
Loads are widened to fp32 at once (the interpreter's bf16 arithmetic is wrong otherwise).
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from kdfast.ops.gpu_resources import register_cap


@triton.jit
def _tile_sum(x_ptr, x_stride, b_ptr, r_ptr, r_stride, rows, cols, mask, D, HAS_B: tl.constexpr,
              HAS_R: tl.constexpr):
    """x + bias + residual of a [BLOCK_N, BLOCK_D] tile, in fp32 (0 outside ``mask``)."""
    s = tl.load(x_ptr + rows[:, None] * x_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        s += tl.load(b_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
    if HAS_R:
        s += tl.load(r_ptr + rows[:, None] * r_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    return s


@triton.jit
def nonorm_fwd_kernel(x_ptr, x_stride, b_ptr, r_ptr, r_stride, g_ptr, beta_ptr, y_ptr, y_stride, N, D,
                      HAS_B: tl.constexpr, HAS_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < N) & (cols[None, :] < D)
    s = _tile_sum(x_ptr, x_stride, b_ptr, r_ptr, r_stride, rows, cols, mask, D, HAS_B, HAS_R)
    g = tl.load(g_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    y = s * g[None, :] + beta[None, :]
    tl.store(y_ptr + rows[:, None] * y_stride + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def nonorm_bwd_kernel(dy_ptr, dy_stride, x_ptr, x_stride, b_ptr, r_ptr, r_stride, g_ptr, dx_ptr, dx_stride,
                      part_ptr, N, D, HAS_B: tl.constexpr, HAS_R: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_D: tl.constexpr, ROWS_PER_PROG: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    g = tl.load(g_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    acc_g = tl.zeros([BLOCK_D], tl.float32)
    acc_b = tl.zeros([BLOCK_D], tl.float32)
    for start in range(0, ROWS_PER_PROG, BLOCK_N):
        rows = (pid * ROWS_PER_PROG + start + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask = (rows[:, None] < N) & (cols[None, :] < D)
        dy = tl.load(dy_ptr + rows[:, None] * dy_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s = _tile_sum(x_ptr, x_stride, b_ptr, r_ptr, r_stride, rows, cols, mask, D, HAS_B, HAS_R)
        tl.store(dx_ptr + rows[:, None] * dx_stride + cols[None, :], (dy * g[None, :]).to(dx_ptr.dtype.element_ty),
                 mask=mask)
        acc_g += tl.sum(dy * s, axis=0)
        acc_b += tl.sum(dy, axis=0)
    # partial rows: [programs, 2, D] fp32 (dgamma, dbeta)
    tl.store(part_ptr + pid * 2 * D + cols, acc_g, mask=cols < D)
    tl.store(part_ptr + pid * 2 * D + D + cols, acc_b, mask=cols < D)


@triton.jit
def relu_bwd_colsum_kernel(dh_ptr, dh_stride, h_ptr, h_stride, part_ptr, N, D, BLOCK_N: tl.constexpr,
                           BLOCK_D: tl.constexpr, ROWS_PER_PROG: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for start in range(0, ROWS_PER_PROG, BLOCK_N):
        rows = (pid * ROWS_PER_PROG + start + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask = (rows[:, None] < N) & (cols[None, :] < D)
        dh = tl.load(dh_ptr + rows[:, None] * dh_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = tl.load(h_ptr + rows[:, None] * h_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dh = tl.where(h > 0.0, dh, 0.0)
        tl.store(dh_ptr + rows[:, None] * dh_stride + cols[None, :], dh.to(dh_ptr.dtype.element_ty), mask=mask)
        acc += tl.sum(dh, axis=0)
    tl.store(part_ptr + pid * D + cols, acc, mask=cols < D)


# Tiles: the whole width (MobileBERT: 128 or 512) by BLOCK_N rows; column sums over ROWS_PER_PROG rows
# per program. On a GPU, 8 elements of the tile per thread: each carries its own 64-bit addresses into
# two or three rows, and at 16 per thread ptxas kept the NoNorm forward (2,048-element tile, 4 warps) and
# the ReLU column sum (4,096, 8 warps) in 64-80 registers with a few bytes spilled. The NoNorm backward
# launches with maxnreg = register_cap(num_warps): left to itself ptxas held its fp16 variant at width
# 128 to 48 registers and spilled 16 B per thread. Larger row blocks on the interpreter (fewer
# Python-level programs).
def _blocks(D: int, device: torch.device) -> tuple[int, int, int, int]:
    block_d = triton.next_power_of_2(max(D, 1))
    if device.type == "cpu":  # interpreter
        block_n = max(1, min(256, 16384 // block_d))
        return block_d, block_n, block_n * 4, 4
    block_n = max(1, min(16, 4096 // block_d))
    return block_d, block_n, block_n * 16, min(16, max(4, block_d * block_n // 256))


def _dummy(x: torch.Tensor) -> torch.Tensor:
    return x  # any valid pointer: never read when the HAS_* flag is off


def nonorm_fwd_triton(x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None,
                      gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """``(x + bias + residual) * gamma + beta`` on 2-D ``[N, D]`` (unit column stride); returns ``y``."""
    N, D = x.shape
    y = torch.empty((N, D), dtype=x.dtype, device=x.device)
    if N == 0 or D == 0:
        return y
    block_d, block_n, _, warps = _blocks(D, x.device)
    r = residual if residual is not None else _dummy(x)
    nonorm_fwd_kernel[(triton.cdiv(N, block_n),)](
        x, x.stride(0), bias if bias is not None else _dummy(x), r, r.stride(0), gamma, beta, y, y.stride(0), N, D,
        HAS_B=bias is not None, HAS_R=residual is not None, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps)
    return y


def nonorm_bwd_triton(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None,
                      gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass: ``(dx, dbias, dgamma, dbeta)`` with ``dx = dy * gamma`` (also the residual's gradient)."""
    N, D = x.shape
    dx = torch.empty((N, D), dtype=x.dtype, device=x.device)
    block_d, block_n, rows_per_prog, warps = _blocks(D, x.device)
    progs = triton.cdiv(N, rows_per_prog)
    part = torch.zeros((max(progs, 1), 2, D), dtype=torch.float32, device=x.device)
    if N and D:
        r = residual if residual is not None else _dummy(x)
        nonorm_bwd_kernel[(progs,)](
            dy, dy.stride(0), x, x.stride(0), bias if bias is not None else _dummy(x), r, r.stride(0), gamma,
            dx, dx.stride(0), part, N, D, HAS_B=bias is not None, HAS_R=residual is not None, BLOCK_N=block_n,
            BLOCK_D=block_d, ROWS_PER_PROG=rows_per_prog, num_warps=warps, maxnreg=register_cap(warps))
    sums = part.sum(0)
    dgamma, dbeta = sums[0].to(x.dtype), sums[1]
    return dx, (gamma.float() * dbeta).to(x.dtype), dgamma, dbeta.to(x.dtype)


def relu_bwd_colsum_triton(dh: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``dh *= (h > 0)`` in place on 2-D ``[N, D]``; returns ``sum_rows dh`` (the bias gradient)."""
    N, D = dh.shape
    block_d, block_n, rows_per_prog, warps = _blocks(D, dh.device)
    progs = triton.cdiv(N, rows_per_prog)
    part = torch.zeros((max(progs, 1), D), dtype=torch.float32, device=dh.device)
    if N and D:
        relu_bwd_colsum_kernel[(progs,)](dh, dh.stride(0), h, h.stride(0), part, N, D, BLOCK_N=block_n,
                                         BLOCK_D=block_d, ROWS_PER_PROG=rows_per_prog, num_warps=warps)
    return part.sum(0).to(dh.dtype)


def aot_configs():
    """Every constexpr combination the launchers pick on a GPU for MobileBERT's widths (128, 512), per dtype."""
    dev = torch.device("cuda")
    for dtype, (has_b, has_r), D in itertools.product(("fp32", "fp16", "bf16"),
                                                      ((True, True), (True, False), (False, True), (False, False)),
                                                      (128, 512)):
        block_d, block_n, rows_per_prog, warps = _blocks(D, dev)
        fwd_sig = {"x_ptr": f"*{dtype}", "x_stride": "i64", "b_ptr": f"*{dtype}", "r_ptr": f"*{dtype}",
                   "r_stride": "i64", "g_ptr": f"*{dtype}", "beta_ptr": f"*{dtype}", "y_ptr": f"*{dtype}",
                   "y_stride": "i64", "N": "i32", "D": "i32"}
        yield nonorm_fwd_kernel, fwd_sig, {"HAS_B": has_b, "HAS_R": has_r, "BLOCK_N": block_n,
                                           "BLOCK_D": block_d}, warps
        bwd_sig = {"dy_ptr": f"*{dtype}", "dy_stride": "i64", "x_ptr": f"*{dtype}", "x_stride": "i64",
                   "b_ptr": f"*{dtype}", "r_ptr": f"*{dtype}", "r_stride": "i64", "g_ptr": f"*{dtype}",
                   "dx_ptr": f"*{dtype}", "dx_stride": "i64", "part_ptr": "*fp32", "N": "i32", "D": "i32"}
        yield nonorm_bwd_kernel, bwd_sig, {"HAS_B": has_b, "HAS_R": has_r, "BLOCK_N": block_n, "BLOCK_D": block_d,
                                           "ROWS_PER_PROG": rows_per_prog}, {"num_warps": warps,
                                                                             "maxnreg": register_cap(warps)}
        if has_b and has_r:
            relu_sig = {"dh_ptr": f"*{dtype}", "dh_stride": "i64", "h_ptr": f"*{dtype}", "h_stride": "i64",
                        "part_ptr": "*fp32", "N": "i32", "D": "i32"}
            yield relu_bwd_colsum_kernel, relu_sig, {"BLOCK_N": block_n, "BLOCK_D": block_d,
                                                     "ROWS_PER_PROG": rows_per_prog}, warps


AOT_CONFIGS = aot_configs
