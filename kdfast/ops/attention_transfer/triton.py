"""Flash attention transfer in Triton: KL(A_t || A_s) or score MSE from Q and K, never L x L.

Per (batch, head) with student scores s = scale_s q_s k_s^T, teacher scores t = scale_t q_t k_t^T
(the two head dims may differ), valid keys j (``key_valid``) and row weights w_i (0 on
uncounted query rows, 1/count otherwise, see :func:`kdfast.flash_attention_transfer`):

    kl:  row_i = sum_j A_t,ij (log A_t,ij - log A_s,ij)    dS_ij = w_i (A_s,ij - A_t,ij)
    mse: row_i = sum_j (s_ij - t_ij)^2                     dS_ij = 2 w_i (s_ij - t_ij)
    dq_s = scale_s dS k_s,   dk_s = scale_s dS^T q_s

Three kernels, each tiling the L x L plane in BLOCK_M x BLOCK_N tiles held in registers:

1. ``_at_fwd_kernel``, one program per (query tile, b*h), looping over key tiles. KL: the
   online soft-max of both maps: running max m and sum Z for s and for t, plus
   acc = sum_j e^{t_j - m_t} (t_j - s_j), rescaled by e^{m_t,old - m_t,new} whenever m_t moves,
   so that at the end row_i = acc / Z_t - lse_t + lse_s. It stores w_i row_i and, for the
   gradient kernels, lse_s and lse_t per row: O(B H L) memory. MSE: acc = sum_j (s - t)^2.
2. ``_at_dq_kernel``, one program per (query tile, b*h), looping over key tiles: recomputes s
   and t, forms dS with the stored lse's (A = e^{s - lse}) and accumulates dq += dS k_s in
   registers.
3. ``_at_dk_kernel``, one program per (key tile, b*h), looping over query tiles: recomputes
   the transposed tiles s^T, t^T and accumulates dk += dS^T q_s.

dk is a sum over *all* query rows. It gets its own kernel (as FlashAttention-2's backward does)
instead of atomics from kernel 2: each program owns its dk tile, so there are no fp32 atomic
adds to contend on (L / BLOCK_M of them per element) and the result is deterministic, bit for
bit, run to run. The price is recomputing the two score tiles once more (4 small GEMMs per tile
instead of 2), which is cheap next to the memory traffic an L x L map would cost.

Local layers (``window`` = w >= 0, ``HAS_WINDOW``): a query tile [i0, i0 + BLOCK_M) loops only over
the key tiles that meet [i0 - w, i0 + BLOCK_M - 1 + w], and a key tile of the dK kernel only over
the query tiles within w of it; inside a tile the band |i - j| <= w joins the key mask. The tiles
outside the band are neither computed nor loaded: O(L w) work per (b, h) instead of O(L^2).

Masked keys and uncounted query rows are loaded as zeros (their Q / K rows may hold anything,
even NaN) and dropped with ``where`` (never multiplied by 0). Loads are widened to fp32 at once
(the interpreter's bf16 arithmetic is wrong otherwise); fp32 inputs use IEEE fp32 dot products,
fp16 / bf16 inputs TF32 ones (exact for their 10 / 7-bit mantissas), accumulation is fp32.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from kdfast.ops.attention_transfer import MAX_TRITON_HEAD_DIMS, triton_takes_heads
from kdfast.ops.gpu_resources import register_cap


@triton.jit
def _load_rows(ptr, offs, rows_on, offs_d, D):
    """[len(offs), BLOCK_D] rows of a contiguous [L, D] matrix, zeros where rows_on is false."""
    return tl.load(ptr + offs[:, None] * D + offs_d[None, :], mask=rows_on[:, None] & (offs_d[None, :] < D),
                   other=0.0).to(tl.float32)


@triton.jit
def _tile_range(start, BLOCK: tl.constexpr, BLOCK_OTHER: tl.constexpr, L, window, HAS_WINDOW: tl.constexpr):
    """[lo, hi): the other axis's tiles (of BLOCK_OTHER) that meet the band of [start, start + BLOCK)."""
    lo = 0
    hi = L
    if HAS_WINDOW:
        lo = tl.maximum(start - window, 0) // BLOCK_OTHER * BLOCK_OTHER
        hi = tl.minimum(start + BLOCK + window, L)
    return lo, hi


@triton.jit
def _band_and(on, rows, cols, window, HAS_WINDOW: tl.constexpr):
    """``on`` [len(rows), len(cols)] and, with a window, |i - j| <= window."""
    if HAS_WINDOW:
        d = rows[:, None] - cols[None, :]
        on = on & (d <= window) & (d >= -window)
    return on


@triton.jit
def _at_fwd_kernel(
    qs_ptr, ks_ptr, qt_ptr, kt_ptr, kv_ptr, w_ptr, lse_s_ptr, lse_t_ptr, loss_ptr,
    L, H, DS, DT, scale_s, scale_t, window,
    IS_MSE: tl.constexpr, HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_ds = tl.arange(0, BLOCK_DS)
    offs_dt = tl.arange(0, BLOCK_DT)
    row_in = offs_m < L
    w = tl.load(w_ptr + b * L + offs_m, mask=row_in, other=0.0).to(tl.float32)
    row_on = w != 0.0
    qs = _load_rows(qs_ptr + bh * L * DS, offs_m, row_on, offs_ds, DS)
    qt = _load_rows(qt_ptr + bh * L * DT, offs_m, row_on, offs_dt, DT)
    m_s = tl.full([BLOCK_M], -float("inf"), tl.float32)
    m_t = tl.full([BLOCK_M], -float("inf"), tl.float32)
    z_s = tl.zeros([BLOCK_M], tl.float32)
    z_t = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M], tl.float32)
    lo, hi = _tile_range(pid_m * BLOCK_M, BLOCK_M, BLOCK_N, L, window, HAS_WINDOW)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_on = tl.load(kv_ptr + b * L + cols, mask=cols < L, other=0) != 0
        ks = _load_rows(ks_ptr + bh * L * DS, cols, col_on, offs_ds, DS)
        kt = _load_rows(kt_ptr + bh * L * DT, cols, col_on, offs_dt, DT)
        s = tl.dot(qs, tl.trans(ks), input_precision=PRECISION) * scale_s
        t = tl.dot(qt, tl.trans(kt), input_precision=PRECISION) * scale_t
        on = _band_and(row_in[:, None] & col_on[None, :], offs_m, cols, window, HAS_WINDOW)
        if IS_MSE:
            d = tl.where(on, s - t, 0.0)
            acc += tl.sum(d * d, axis=1)
        else:
            diff = t - s  # finite: masked keys were loaded as zeros (-inf - -inf would be NaN)
            s = tl.where(on, s, -float("inf"))
            t = tl.where(on, t, -float("inf"))
            m_s_new = tl.maximum(m_s, tl.max(s, axis=1))
            m_t_new = tl.maximum(m_t, tl.max(t, axis=1))
            # a row with no valid key so far keeps max -inf: shift by 0 instead (e^{-inf - -inf} is NaN)
            ref_s = tl.where(m_s_new == -float("inf"), 0.0, m_s_new)
            ref_t = tl.where(m_t_new == -float("inf"), 0.0, m_t_new)
            z_s = z_s * tl.exp(m_s - ref_s) + tl.sum(tl.exp(s - ref_s[:, None]), axis=1)
            alpha_t = tl.exp(m_t - ref_t)
            e_t = tl.exp(t - ref_t[:, None])
            z_t = z_t * alpha_t + tl.sum(e_t, axis=1)
            acc = acc * alpha_t + tl.sum(tl.where(on, e_t * diff, 0.0), axis=1)
            m_s = m_s_new
            m_t = m_t_new
    if IS_MSE:
        row = acc
    else:
        # a row without any key (possible only with uncounted rows or a window over padding) gives
        # z = 0: its loss is 0 and its lse never used (0 keeps them finite)
        live = z_t > 0
        lse_s = tl.where(live, m_s + tl.log(tl.where(live, z_s, 1.0)), 0.0)
        lse_t = tl.where(live, m_t + tl.log(tl.where(live, z_t, 1.0)), 0.0)
        row = tl.where(live, acc / tl.where(live, z_t, 1.0) - lse_t + lse_s, 0.0)
        tl.store(lse_s_ptr + bh * L + offs_m, lse_s, mask=row_in)
        tl.store(lse_t_ptr + bh * L + offs_m, lse_t, mask=row_in)
    tl.store(loss_ptr + bh * L + offs_m, tl.where(row_on, w * row, 0.0), mask=row_in)


@triton.jit
def _at_dq_kernel(
    qs_ptr, ks_ptr, qt_ptr, kt_ptr, kv_ptr, w_ptr, lse_s_ptr, lse_t_ptr, dq_ptr,
    L, H, DS, DT, scale_s, scale_t, window,
    IS_MSE: tl.constexpr, HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_ds = tl.arange(0, BLOCK_DS)
    offs_dt = tl.arange(0, BLOCK_DT)
    row_in = offs_m < L
    w = tl.load(w_ptr + b * L + offs_m, mask=row_in, other=0.0).to(tl.float32)
    row_on = w != 0.0
    qs = _load_rows(qs_ptr + bh * L * DS, offs_m, row_on, offs_ds, DS)
    qt = _load_rows(qt_ptr + bh * L * DT, offs_m, row_on, offs_dt, DT)
    if not IS_MSE:
        lse_s = tl.load(lse_s_ptr + bh * L + offs_m, mask=row_on, other=0.0)
        lse_t = tl.load(lse_t_ptr + bh * L + offs_m, mask=row_on, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_DS], tl.float32)
    lo, hi = _tile_range(pid_m * BLOCK_M, BLOCK_M, BLOCK_N, L, window, HAS_WINDOW)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_on = tl.load(kv_ptr + b * L + cols, mask=cols < L, other=0) != 0
        ks = _load_rows(ks_ptr + bh * L * DS, cols, col_on, offs_ds, DS)
        kt = _load_rows(kt_ptr + bh * L * DT, cols, col_on, offs_dt, DT)
        s = tl.dot(qs, tl.trans(ks), input_precision=PRECISION) * scale_s
        t = tl.dot(qt, tl.trans(kt), input_precision=PRECISION) * scale_t
        if IS_MSE:
            g = 2.0 * (s - t)
        else:
            g = tl.exp(s - lse_s[:, None]) - tl.exp(t - lse_t[:, None])
        on = _band_and(row_on[:, None] & col_on[None, :], offs_m, cols, window, HAS_WINDOW)
        ds = tl.where(on, w[:, None] * g, 0.0)
        dq += tl.dot(ds, ks, input_precision=PRECISION)
    dq = dq * scale_s
    tl.store(dq_ptr + bh * L * DS + offs_m[:, None] * DS + offs_ds[None, :], dq.to(dq_ptr.dtype.element_ty),
             mask=row_in[:, None] & (offs_ds[None, :] < DS))


@triton.jit
def _at_dk_kernel(
    qs_ptr, ks_ptr, qt_ptr, kt_ptr, kv_ptr, w_ptr, lse_s_ptr, lse_t_ptr, dk_ptr,
    L, H, DS, DT, scale_s, scale_t, window,
    IS_MSE: tl.constexpr, HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_ds = tl.arange(0, BLOCK_DS)
    offs_dt = tl.arange(0, BLOCK_DT)
    col_in = offs_n < L
    col_on = tl.load(kv_ptr + b * L + offs_n, mask=col_in, other=0) != 0
    ks = _load_rows(ks_ptr + bh * L * DS, offs_n, col_on, offs_ds, DS)
    kt = _load_rows(kt_ptr + bh * L * DT, offs_n, col_on, offs_dt, DT)
    dk = tl.zeros([BLOCK_N, BLOCK_DS], tl.float32)
    lo, hi = _tile_range(pid_n * BLOCK_N, BLOCK_N, BLOCK_M, L, window, HAS_WINDOW)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        w = tl.load(w_ptr + b * L + rows, mask=rows < L, other=0.0).to(tl.float32)
        row_on = w != 0.0
        qs = _load_rows(qs_ptr + bh * L * DS, rows, row_on, offs_ds, DS)
        qt = _load_rows(qt_ptr + bh * L * DT, rows, row_on, offs_dt, DT)
        # transposed tiles [BLOCK_N keys, BLOCK_M queries]
        s = tl.dot(ks, tl.trans(qs), input_precision=PRECISION) * scale_s
        t = tl.dot(kt, tl.trans(qt), input_precision=PRECISION) * scale_t
        if IS_MSE:
            g = 2.0 * (s - t)
        else:
            lse_s = tl.load(lse_s_ptr + bh * L + rows, mask=row_on, other=0.0)
            lse_t = tl.load(lse_t_ptr + bh * L + rows, mask=row_on, other=0.0)
            g = tl.exp(s - lse_s[None, :]) - tl.exp(t - lse_t[None, :])
        on = _band_and(col_on[:, None] & row_on[None, :], offs_n, rows, window, HAS_WINDOW)
        ds = tl.where(on, w[None, :] * g, 0.0)
        dk += tl.dot(ds, qs, input_precision=PRECISION)
    dk = dk * scale_s
    tl.store(dk_ptr + bh * L * DS + offs_n[:, None] * DS + offs_ds[None, :], dk.to(dk_ptr.dtype.element_ty),
             mask=col_in[:, None] & (offs_ds[None, :] < DS))


# GPU tiles: BLOCK_M = BLOCK_N query / key rows, NUM_WARPS_GPU warps, maxnreg = register_cap(8) = 255
# (not for the fp32 forward: launch_meta).
# ptxas -v (kdfast.ops.aot --report) on sm_80 / sm_90: at 4 warps the fp32 'ieee' dq kernel with 64-row
# tiles was squeezed to 32 registers and moved 30-47 KB per thread through local memory; at 8 warps
# without maxnreg ptxas still held some configurations to 80-128 registers and spilled 8-56 B (fp32 dq
# at heads 32 / 64 on sm_90, a windowed half-precision MSE at 64 / 64 on sm_80); with maxnreg none
# spills. 64-row tiles stay spill-free only for the half-precision heads up to 32 + 64; fp32 (its 'ieee'
# products take more registers) and wider heads take 32 rows, up to heads of 64 (MAX_TRITON_HEAD_DIMS).
# Wider heads have no spill-free tile: at a student head of 64 under a teacher's 128 the fp32 KL dk kernel
# spilled 8 B per thread on sm_90 (every other kernel, loss and dtype fitted in 255 registers); at 128
# under 256 the three kernels spilled 8-1,460 B per thread at 32 rows, and 160-4,164 B at 16 rows
# (1 warp) in all but the half-precision forward. So the Triton backend does not take them (the registry
# runs the torch backend instead, kdfast.ops.attention_transfer.flash_cols).
# The interpreter (CPU tensors) is fastest with big tiles.
BLOCK_GPU = 64
BLOCK_INTERPRETER = 128
NUM_WARPS_GPU = 8
TL_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def tile_meta(ds: int, dt: int, dtype: torch.dtype, cuda: bool, block: int | None = None) -> dict:
    """The launch constants of the three kernels for student / teacher head dims ``ds`` / ``dt``:
    ``BLOCK_M`` = ``BLOCK_N`` (``block`` overrides it; on a GPU BLOCK_GPU rows, half of it for fp32 or
    heads wider than 32 (student) and 64 (teacher)), ``BLOCK_DS``, ``BLOCK_DT``, ``PRECISION``, ``num_warps``
    and ``maxnreg``. On a GPU the heads must be within MAX_TRITON_HEAD_DIMS (``ValueError`` otherwise:
    no tile of theirs compiles without spilling registers)."""
    if cuda and not triton_takes_heads(ds, dt):
        raise ValueError(f"head dims must be at most {MAX_TRITON_HEAD_DIMS} (student, teacher) on a GPU, got "
                         f"({ds}, {dt}): the torch backend takes wider heads")
    bds, bdt = _block_d(ds), _block_d(dt)
    narrow = bds <= 32 and bdt <= 64 and _precision(dtype) == "tf32"
    bm = block or ((BLOCK_GPU if narrow else BLOCK_GPU // 2) if cuda else BLOCK_INTERPRETER)
    return dict(BLOCK_M=bm, BLOCK_N=bm, BLOCK_DS=bds, BLOCK_DT=bdt, PRECISION=_precision(dtype),
                num_warps=NUM_WARPS_GPU, maxnreg=register_cap(NUM_WARPS_GPU))


def launch_meta(meta: dict, kernel) -> dict:
    """:func:`tile_meta`'s constants as ``kernel`` launches with them: the fp32 forward without maxnreg
    (ptxas -v on sm_90 at heads 64 / 64: 171 registers and no spill left to itself, 255 registers and
    56 + 48 B spilled with maxnreg 255), every other kernel as given."""
    if kernel is _at_fwd_kernel and meta.get("PRECISION") == "ieee":
        return {k: v for k, v in meta.items() if k != "maxnreg"}
    return meta


def attention_transfer_fwd_bwd_triton(
    q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor, key_valid: torch.Tensor,
    row_weight: torch.Tensor, scale_s: float, scale_t: float, mse: bool, need_grad: bool,
    block: int | None = None, window: int = -1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the three kernels on [B, H, L, d] inputs (made contiguous here).

    ``key_valid`` [B, L] bool, ``row_weight`` [B, L] (0 = uncounted query row). Returns
    ``(loss_rows [B, H, L] float32, dq_s, dk_s)`` as :func:`kdfast.ops.attention_transfer.eager.
    attention_transfer_fwd_bwd_torch` does (empty gradients when ``need_grad`` is false).
    ``block`` overrides BLOCK_M = BLOCK_N (tests use it to exercise several tiles). ``window``:
    -1 global, w >= 0 the band |i - j| <= w (only the tiles that meet it are visited).
    """
    B, H, L, DS = q_s.shape
    DT = q_t.shape[-1]
    q_s, k_s, q_t, k_t = (x.contiguous() for x in (q_s, k_s, q_t, k_t))
    kv = key_valid.to(torch.int8).contiguous()
    w = row_weight.to(torch.float32).contiguous()
    dev = q_s.device
    loss_rows = torch.empty(B, H, L, dtype=torch.float32, device=dev)
    lse_s = torch.empty(B, H, L, dtype=torch.float32, device=dev)
    lse_t = torch.empty(B, H, L, dtype=torch.float32, device=dev)
    has_window = 0 <= window < L - 1
    meta = dict(IS_MSE=bool(mse), HAS_WINDOW=has_window, **tile_meta(DS, DT, q_s.dtype, q_s.is_cuda, block))
    grid = (triton.cdiv(L, meta["BLOCK_M"]), B * H)
    args = (q_s, k_s, q_t, k_t, kv, w, lse_s, lse_t)
    sizes = (L, H, DS, DT, float(scale_s), float(scale_t), int(window) if has_window else -1)
    _at_fwd_kernel[grid](*args, loss_rows, *sizes, **launch_meta(meta, _at_fwd_kernel))
    if not need_grad:
        return loss_rows, q_s.new_empty(0), k_s.new_empty(0)
    dq = torch.empty_like(q_s)
    dk = torch.empty_like(k_s)
    _at_dq_kernel[grid](*args, dq, *sizes, **launch_meta(meta, _at_dq_kernel))
    _at_dk_kernel[grid](*args, dk, *sizes, **launch_meta(meta, _at_dk_kernel))
    return loss_rows, dq, dk


# Compiled ahead of time (CI, no GPU): per dtype, the largest heads of each GPU tile: the usual
# distillation pair (student dh 32 under a BERT-base teacher, dh 64) at 64 rows, and the widest heads the
# 32-row tile takes, 64 for both (a smaller head at the same tile holds fewer values per thread, so it
# needs no more registers or shared memory). Wider heads run on the torch backend.
def _aot_points():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for dims in ((32, 64), MAX_TRITON_HEAD_DIMS):
            yield dtype, dims


def aot_configs():
    """(kernel, signature, constexprs, launch options) for kdfast.ops.aot: each point above x 3 kernels x 2
    losses x global / local."""
    for (dtype, (ds, dt)), fn, mse, has_window in itertools.product(
        _aot_points(), (_at_fwd_kernel, _at_dq_kernel, _at_dk_kernel), (False, True), (False, True),
    ):
        tdt = TL_DTYPES[dtype]
        last = "loss_ptr" if fn is _at_fwd_kernel else ("dq_ptr" if fn is _at_dq_kernel else "dk_ptr")
        signature = {
            "qs_ptr": f"*{tdt}", "ks_ptr": f"*{tdt}", "qt_ptr": f"*{tdt}", "kt_ptr": f"*{tdt}", "kv_ptr": "*i8",
            "w_ptr": "*fp32", "lse_s_ptr": "*fp32", "lse_t_ptr": "*fp32",
            last: "*fp32" if fn is _at_fwd_kernel else f"*{tdt}",
            "L": "i32", "H": "i32", "DS": "i32", "DT": "i32", "scale_s": "fp32", "scale_t": "fp32", "window": "i32",
        }
        meta = launch_meta(tile_meta(ds, dt, dtype, cuda=True), fn)
        options = {k: meta.pop(k) for k in ("num_warps", "maxnreg") if k in meta}
        yield fn, signature, {"IS_MSE": mse, "HAS_WINDOW": has_window, **meta}, options


AOT_CONFIGS = aot_configs
