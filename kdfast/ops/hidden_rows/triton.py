"""The ``triton`` backend of :mod:`kdfast.ops.hidden_rows`: the hidden-MSE epilogue and the fused cosine
rows.

Hidden-state transfer row kernels in Triton: the MSE epilogue and the fused cosine loss.

1. ``_mse_epilogue_kernel`` (TinyBERT hidden MSE). The projection GEMM Y = h_s W_p^T + b_p is
   done by the library GEMM, a chunk of rows at a time, into an fp32 buffer; this kernel then
   reads each row of Y once together with the teacher row h_t and the row weight w (1 / n for
   a counted row, 0 otherwise) and writes

       loss_r = w sum_j (Y_j - h_t,j)^2        and, over Y's own buffer,
       dY_j   = 2 w (Y_j - h_t,j)

   so the chunk of Y turns into the chunk of dY in place: Y is never kept for backward and no
   second buffer is allocated. Rows with w = 0 give loss 0 and dY = 0 (NaN-safe).

2. ``_cosine_kernel`` (DistilBERT cosine loss). One program per row reads s and t once (the
   whole row in one block, BLOCK_D >= D) and writes the weighted row loss w (1 - cos) and,
   when NEED_GRAD, d/ds of it from the same registers:

       ns = max(|s|, eps), nt = max(|t|, eps), cos = s.t / (ns nt)
       d loss_r / d s = -w (t / (ns nt) - [|s| > eps] cos s / ns^2)

Loads are widened to fp32 at once (the interpreter's bf16 arithmetic is wrong otherwise).
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

# the cosine kernel keeps a whole row in registers (the family's registration sends wider rows to torch)
from kdfast.ops.hidden_rows import MAX_COSINE_WIDTH


@triton.jit
def _mse_epilogue_kernel(y_ptr, t_ptr, w_ptr, loss_ptr, D, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    w = tl.load(w_ptr + row).to(tl.float32)
    on = w != 0.0
    offs = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for start in range(0, D, BLOCK_D):
        cols = start + offs
        inb = cols < D
        y = tl.load(y_ptr + row * D + cols, mask=inb, other=0.0).to(tl.float32)
        t = tl.load(t_ptr + row * D + cols, mask=inb, other=0.0).to(tl.float32)
        d = tl.where(on, tl.where(inb, y - t, 0.0), 0.0)
        acc += d * d
        tl.store(y_ptr + row * D + cols, (2.0 * w * d).to(y_ptr.dtype.element_ty), mask=inb)
    tl.store(loss_ptr + row, tl.where(on, w * tl.sum(acc, axis=0), 0.0))


@triton.jit
def _cosine_kernel(s_ptr, t_ptr, w_ptr, loss_ptr, g_ptr, D, eps,
                   NEED_GRAD: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    w = tl.load(w_ptr + row).to(tl.float32)
    on = w != 0.0
    cols = tl.arange(0, BLOCK_D)
    inb = cols < D
    s = tl.where(on, tl.load(s_ptr + row * D + cols, mask=inb, other=0.0).to(tl.float32), 0.0)
    t = tl.where(on, tl.load(t_ptr + row * D + cols, mask=inb, other=0.0).to(tl.float32), 0.0)
    dot = tl.sum(s * t, axis=0)
    norm_s = tl.sqrt(tl.sum(s * s, axis=0))
    norm_t = tl.sqrt(tl.sum(t * t, axis=0))
    ns = tl.maximum(norm_s, eps)
    nt = tl.maximum(norm_t, eps)
    cos = dot / (ns * nt)
    tl.store(loss_ptr + row, tl.where(on, w * (1.0 - cos), 0.0))
    if NEED_GRAD:
        radial = tl.where(norm_s > eps, cos / (ns * ns), 0.0)
        g = -w * (t / (ns * nt) - radial * s)
        g = tl.where(on, g, 0.0)
        tl.store(g_ptr + row * D + cols, g.to(g_ptr.dtype.element_ty), mask=inb)


MAX_BLOCK_GPU = 4096
MAX_BLOCK_INTERPRETER = 16384


def _num_warps(block: int) -> int:
    """16 values of a row per thread at most: the cosine kernel holds s and t whole (8,192 wide at 8 warps
    made ptxas keep it in 64 registers and spill on sm_90)."""
    return 16 if block >= 8192 else 8 if block >= 2048 else 4


def block_meta(D: int, cap: int) -> dict:
    """``BLOCK_D`` (the row's next power of two, at most ``cap``) and ``num_warps`` of a row kernel."""
    block = min(triton.next_power_of_2(D), cap)
    return dict(BLOCK_D=block, num_warps=_num_warps(block))


def mse_epilogue_triton(y: torch.Tensor, t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """In place: ``y`` (contiguous fp32 [C, D]) becomes dY = 2 w (y - t); returns the fp32 row losses
    w sum (y - t)^2, [C]. ``t`` contiguous [C, D] (any float dtype), ``w`` fp32 [C]."""
    C, D = y.shape
    loss = torch.empty(C, dtype=torch.float32, device=y.device)
    _mse_epilogue_kernel[(C,)](y, t, w, loss, D, **block_meta(D, MAX_BLOCK_GPU if y.is_cuda else MAX_BLOCK_INTERPRETER))
    return loss


def cosine_triton(s: torch.Tensor, t: torch.Tensor, w: torch.Tensor, eps: float,
                  need_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted row losses w (1 - cos) (fp32 [N]) and, when ``need_grad``, their gradient with
    respect to ``s`` (``s``'s dtype, [N, D]; an empty tensor otherwise). ``s``, ``t`` contiguous
    [N, D] with D <= MAX_COSINE_WIDTH, ``w`` fp32 [N]."""
    N, D = s.shape
    loss = torch.empty(N, dtype=torch.float32, device=s.device)
    g = torch.empty_like(s) if need_grad else s.new_empty(0)
    _cosine_kernel[(N,)](s, t, w, loss, g if need_grad else loss, D, float(eps), NEED_GRAD=need_grad,
                         **block_meta(D, MAX_COSINE_WIDTH))
    return loss, g


def aot_configs():
    """Both kernels x dtype at the largest block of each ``num_warps`` the launchers pick (for kdfast.ops.aot)."""
    for dtype, block in itertools.product(("fp32", "fp16", "bf16"), (1024, MAX_BLOCK_GPU)):
        signature = {"y_ptr": "*fp32", "t_ptr": f"*{dtype}", "w_ptr": "*fp32", "loss_ptr": "*fp32", "D": "i32"}
        yield _mse_epilogue_kernel, signature, {"BLOCK_D": block}, _num_warps(block)
    for dtype, need_grad, block in itertools.product(("fp32", "fp16", "bf16"), (False, True),
                                                     (1024, 4096, MAX_COSINE_WIDTH)):
        signature = {"s_ptr": f"*{dtype}", "t_ptr": f"*{dtype}", "w_ptr": "*fp32", "loss_ptr": "*fp32",
                     "g_ptr": f"*{dtype}" if need_grad else "*fp32", "D": "i32", "eps": "fp32"}
        yield _cosine_kernel, signature, {"NEED_GRAD": need_grad, "BLOCK_D": block}, _num_warps(block)


AOT_CONFIGS = aot_configs
