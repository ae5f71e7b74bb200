"""Sparse-teacher logit distillation (top-k + rest bucket, or sampled ids) in Triton: one program per row.

Math in :func:`kdfast.sparse_kd_loss`. For a row of student logits s (x = s / T), K kept ids
and their teacher values v:

1. Student statistics: running (max, sum of exponentials) of x over the whole row (and of s
   when the MLM term needs T = 1). A row that fits one block (V <= BLOCK_V) is loaded once and
   kept in registers; a longer row is folded chunk by chunk and read again for the gradient.
2. Gather the K student logits at the kept ids; teacher side from the K values only:
   topk: p_t,k = e^{y_k - lse_t}, rest mass p_r = -expm1(lse_K - lse_t); the student's rest
   sum-exp is Z_R = Z - sum_k e^{x_k - m} with P_r = Z_R / Z (relative error ~ eps / P_r), and
   the rows where P_r < 1% redo the two sums in fp64 from identical terms, so that the kept
   terms cancel exactly (see the kernel); sampled: q_k = the normalised weights summed over
   equal ids (a K x K comparison).
3. Loss row, then the gradient of the whole row in the same program: first the dense part
   coef (p_s,j - p_r e^{x_j - lse_R}) (+ MLM) everywhere, a barrier, then the exact values
   coef (p_s,k - p_t,k) (+ MLM) stored at the kept ids (repeated sampled ids store identical
   values, so the race is benign).

Loads are widened to fp32 at once (the interpreter's bf16 arithmetic is wrong otherwise).
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from kdfast.ops.logit_kd.triton import MAX_BLOCK_V_GPU, MAX_SINGLE_BLOCK_V_GPU, launch_options, row_block_meta, row_mlm, zero_row


@triton.jit
def _neg_expm1(d):
    """1 - e^d for d <= 0 without cancellation near 0."""
    small = d > -1e-3
    series = -d * (1.0 + d * (0.5 + d * (1.0 / 6.0)))
    return tl.where(small, series, 1.0 - tl.exp(d))


@triton.jit
def _merge_max_sum(m_a, z_a, m_b, z_b):
    m = tl.maximum(m_a, m_b)
    return m, z_a * tl.exp(m_a - m) + z_b * tl.exp(m_b - m)


@triton.jit
def _dense_grad(s, offs, label, inv_t, lse_s, lse_r, p_r, lse_1, coef_kd, coef_mlm,
                HAS_REST: tl.constexpr, HAS_MLM: tl.constexpr):
    x = s * inv_t
    g = tl.exp(x - lse_s)
    if HAS_REST:
        g -= p_r * tl.exp(x - lse_r)
    g = coef_kd * g
    if HAS_MLM:
        g += coef_mlm * (tl.exp(s - lse_1) - tl.where(offs == label, 1.0, 0.0))
    return g


@triton.jit
def sparse_kd_fwd_bwd_kernel(
    s_ptr, s_stride, ids_ptr, ids_stride, v_ptr, v_stride, lse_ptr, g_ptr, g_stride, labels_ptr, w_ptr, loss_ptr,
    mw_ptr, V, K, temperature, alpha_kd, alpha_mlm,
    SAMPLED: tl.constexpr, HAS_REST: tl.constexpr, HAS_MLM: tl.constexpr, NEED_T1: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, SINGLE_BLOCK: tl.constexpr, MLM_WEIGHT: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    g_row = g_ptr + row * g_stride
    w = tl.load(w_ptr + row).to(tl.float32)
    offs = tl.arange(0, BLOCK_V)
    if w == 0.0:
        # Uncounted row: no loss, zero gradient, inputs never read.
        zero_row(g_row, V, BLOCK_V)
        tl.store(loss_ptr + row, 0.0)
    else:
        inv_t = 1.0 / temperature
        a_mlm, label = row_mlm(labels_ptr, mw_ptr, row, w, alpha_mlm, HAS_MLM, MLM_WEIGHT)

        # 1. student statistics over the full row
        if SINGLE_BLOCK:
            valid = offs < V
            s = tl.load(s_row + offs, mask=valid, other=-float("inf")).to(tl.float32)
            x = s * inv_t
            m_s = tl.max(x, axis=0)
            z_s = tl.sum(tl.exp(x - m_s), axis=0)
            if NEED_T1:
                m_1 = tl.max(s, axis=0)
                z_1 = tl.sum(tl.exp(s - m_1), axis=0)
            else:
                m_1 = m_s
                z_1 = z_s
        else:
            m_s = -float("inf")
            z_s = 0.0
            m_1 = -float("inf")
            z_1 = 0.0
            for start in range(0, V, BLOCK_V):
                valid_c = start + offs < V
                s_c = tl.load(s_row + start + offs, mask=valid_c, other=-float("inf")).to(tl.float32)
                x_c = s_c * inv_t
                cm_s = tl.max(x_c, axis=0)
                m_s, z_s = _merge_max_sum(m_s, z_s, cm_s, tl.sum(tl.exp(x_c - cm_s), axis=0))
                if NEED_T1:
                    cm_1 = tl.max(s_c, axis=0)
                    m_1, z_1 = _merge_max_sum(m_1, z_1, cm_1, tl.sum(tl.exp(s_c - cm_1), axis=0))
            if not NEED_T1:
                m_1 = m_s
                z_1 = z_s
        lse_s = m_s + tl.log(z_s)
        lse_1 = m_1 + tl.log(z_1)  # equals lse_s when T == 1 (NEED_T1 off)

        # 2. the kept ids: student gathered, teacher from the values
        koffs = tl.arange(0, BLOCK_K)
        kvalid = koffs < K
        ids = tl.load(ids_ptr + row * ids_stride + koffs, mask=kvalid, other=0)
        s_k = tl.load(s_row + ids, mask=kvalid, other=0.0).to(tl.float32)
        x_k = s_k * inv_t
        log_q_k = x_k - lse_s
        v = tl.load(v_ptr + row * v_stride + koffs, mask=kvalid, other=0.0).to(tl.float32)
        p_r = 0.0
        lse_r = 0.0
        if SAMPLED:
            wk = tl.where(kvalid, v, 0.0)
            wn = wk / tl.sum(wk, axis=0)
            same = (ids[:, None] == ids[None, :]) & kvalid[None, :]
            tgt = tl.sum(tl.where(same, wn[None, :], 0.0), axis=1)  # q at each kept id (repeats summed)
            used = wn > 0  # padding lanes and zero-weight repeats contribute nothing
            kd = tl.sum(tl.where(used, wn * (tl.log(tl.where(used, tgt, 1.0)) - log_q_k), 0.0), axis=0)
        else:
            y = tl.where(kvalid, v * inv_t, -float("inf"))
            m_y = tl.max(y, axis=0)
            lse_kept = m_y + tl.log(tl.sum(tl.exp(y - m_y), axis=0))
            if HAS_REST:
                lse_t = tl.maximum(tl.load(lse_ptr + row).to(tl.float32), lse_kept)
            else:
                lse_t = lse_kept
            log_p = tl.where(kvalid, y - lse_t, 0.0)  # finite on padding lanes: no 0 * inf there
            tgt = tl.where(kvalid, tl.exp(log_p), 0.0)
            kd = tl.sum(tl.where(kvalid, tgt * (log_p - log_q_k), 0.0), axis=0)
            if HAS_REST:
                p_r = _neg_expm1(lse_kept - lse_t)
                z_kept = tl.sum(tl.where(kvalid, tl.exp(x_k - m_s), 0.0), axis=0)
                z_r = z_s - z_kept
                lse_r = m_s + tl.log(tl.maximum(z_r, z_s * 1e-30))
                if z_r < 0.01 * z_s:
                    # Under 1% of the student's mass outside the kept ids: Z - Z_kept cancels (relative
                    # error ~ eps / P_r). Recompute both sums from bitwise-identical terms
                    # e_j = exp((s_j - c) / T) (fixed shift c; a subtraction then a product, so no FMA
                    # contraction can make a kept term differ between the sums), accumulated in fp64:
                    # the kept terms then cancel exactly. Registers only for a single-block row; one
                    # more read of the row, for these rows only, on the chunked path.
                    shift = m_s * temperature
                    c2 = 1.4426950408889634 * inv_t
                    if SINGLE_BLOCK:
                        e_all = tl.sum(tl.exp2((s - shift) * c2).to(tl.float64), axis=0)
                    else:
                        e_all = tl.full((), 0.0, tl.float64)
                        for start in range(0, V, BLOCK_V):
                            s_c = tl.load(s_row + start + offs, mask=start + offs < V,
                                          other=-float("inf")).to(tl.float32)
                            e_all += tl.sum(tl.exp2((s_c - shift) * c2).to(tl.float64), axis=0)
                    e_kept = tl.sum(tl.where(kvalid, tl.exp2((s_k - shift) * c2), 0.0).to(tl.float64), axis=0)
                    lse_r = shift * inv_t + tl.log(tl.maximum((e_all - e_kept).to(tl.float32), 1e-30))
                kd += tl.where(p_r > 0, p_r * (tl.log(p_r) - (lse_r - lse_s)), 0.0)

        # 3. loss row
        loss = alpha_kd * temperature * temperature * kd
        if HAS_MLM:
            loss += a_mlm * (lse_1 - tl.load(s_row + label).to(tl.float32))
        tl.store(loss_ptr + row, w * loss)
        coef_kd = w * alpha_kd * temperature
        coef_mlm = w * a_mlm

        # 4. gradient: dense part everywhere, then the kept ids
        if SINGLE_BLOCK:
            g = _dense_grad(s, offs, label, inv_t, lse_s, lse_r, p_r, lse_1, coef_kd, coef_mlm, HAS_REST, HAS_MLM)
            tl.store(g_row + offs, g.to(g_ptr.dtype.element_ty), mask=valid)
        else:
            for start in range(0, V, BLOCK_V):
                valid_c = start + offs < V
                s_c = tl.load(s_row + start + offs, mask=valid_c, other=0.0).to(tl.float32)
                g = _dense_grad(s_c, start + offs, label, inv_t, lse_s, lse_r, p_r, lse_1, coef_kd, coef_mlm,
                                HAS_REST, HAS_MLM)
                tl.store(g_row + start + offs, g.to(g_ptr.dtype.element_ty), mask=valid_c)
        tl.debug_barrier()  # the dense stores above land before the kept ids are overwritten
        g_k = coef_kd * (tl.exp(log_q_k) - tgt)
        if HAS_MLM:
            g_k += coef_mlm * (tl.exp(s_k - lse_1) - tl.where(ids == label, 1.0, 0.0))
        tl.store(g_row + ids, g_k.to(g_ptr.dtype.element_ty), mask=kvalid)


def _block_k(K: int) -> int:
    return max(16, triton.next_power_of_2(K))


def sparse_kd_fwd_bwd_triton(
    student: torch.Tensor,
    ids: torch.Tensor,
    values: torch.Tensor,
    teacher_lse: torch.Tensor | None,
    labels: torch.Tensor,
    row_weight: torch.Tensor,
    grad: torch.Tensor,
    temperature: float,
    alpha_kd: float,
    alpha_mlm: float,
    sampled: bool,
    block_v: int | None = None,
    mlm_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch :func:`sparse_kd_fwd_bwd_kernel` on student [N, V], ids/values [N, K] (unit column strides).

    Returns the weighted loss rows (float32) and writes the gradient into ``grad``.
    ``block_v`` overrides the block size (tests use it to exercise the chunked path);
    ``mlm_weight`` [N] float32 weights the MLM term per row (the package contract).
    """
    N, V = student.shape
    K = ids.shape[1]
    loss_rows = torch.empty(N, dtype=torch.float32, device=student.device)
    if N == 0:
        return loss_rows
    has_rest = (not sampled) and teacher_lse is not None and K < V
    sparse_kd_fwd_bwd_kernel[(N,)](
        student, student.stride(0), ids, ids.stride(0), values, values.stride(0),
        teacher_lse if has_rest else row_weight, grad, grad.stride(0), labels, row_weight, loss_rows,
        row_weight if mlm_weight is None else mlm_weight, V, K, float(temperature), float(alpha_kd), float(alpha_mlm),
        SAMPLED=bool(sampled), HAS_REST=has_rest, HAS_MLM=alpha_mlm != 0,
        NEED_T1=alpha_mlm != 0 and temperature != 1, BLOCK_K=_block_k(K),
        MLM_WEIGHT=mlm_weight is not None and alpha_mlm != 0, **row_block_meta(V, student.is_cuda, block_v),
    )
    return loss_rows


def aot_configs():
    """The constexpr combinations the launcher picks, per student dtype, fp16 teacher values (the cache's),
    at logit KD's largest blocks (:func:`kdfast.ops.logit_kd.triton.row_block_meta`), whole and chunked."""
    for dtype, (sampled, has_rest), (has_mlm, need_t1, mlm_weight), single in itertools.product(
        ("fp32", "fp16", "bf16"), ((False, False), (False, True), (True, False)),
        ((False, False, False), (True, True, False), (True, True, True)), (True, False),
    ):
        bv = MAX_SINGLE_BLOCK_V_GPU if single else MAX_BLOCK_V_GPU
        signature = {
            "s_ptr": f"*{dtype}", "s_stride": "i64", "ids_ptr": "*i64", "ids_stride": "i64", "v_ptr": "*fp16",
            "v_stride": "i64", "lse_ptr": "*fp32", "g_ptr": f"*{dtype}", "g_stride": "i64", "labels_ptr": "*i64",
            "w_ptr": "*fp32", "loss_ptr": "*fp32", "mw_ptr": "*fp32", "V": "i32", "K": "i32", "temperature": "fp32",
            "alpha_kd": "fp32", "alpha_mlm": "fp32",
        }
        constexprs = {"SAMPLED": sampled, "HAS_REST": has_rest, "HAS_MLM": has_mlm, "NEED_T1": need_t1,
                      "BLOCK_V": bv, "BLOCK_K": 64, "SINGLE_BLOCK": single, "MLM_WEIGHT": mlm_weight}
        yield sparse_kd_fwd_bwd_kernel, signature, constexprs, launch_options(row_block_meta(bv, cuda=True))


AOT_CONFIGS = aot_configs
