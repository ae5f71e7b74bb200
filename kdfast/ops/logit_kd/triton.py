"""Fused logit-distillation loss and gradient in Triton: one program per row.

Algorithm (math in csrc/common/kd_math.h and :func:`kdfast.kd_loss`). For a row of student
logits s and teacher logits t, x = s/T and y = t/T:

1. Statistics. Keep running (max, sum of exponentials) for x, for y and, when the MLM term
   needs a T=1 soft-max, for s, plus A = sum_j e^{y_j - m_t} (y_j - x_j) (or -x_j for soft
   cross-entropy), rescaled whenever m_t moves. A row that fits one block (V <= BLOCK_V, e.g.
   30522 <= 32768) is loaded once and kept in registers; a longer row is folded chunk by chunk.
2. Loss: kd = A / Z_t + lse_s - lse_t (a row whose kd < 1 is recomputed in the small-KL form
   of csrc/common/kd_math.h, with one more read of the row), ce = lse_1 - s_label,
   loss = w (alpha_kd T^2 kd + alpha_mlm ce), with alpha_mlm scaled per row by m / w when an
   MLM row weight m is given (KD on every row, MLM on the labelled ones, in the same pass).
3. Gradient, known at once because the teacher is frozen:
   g_j = w (alpha_kd T (p_s,j - p_t,j) + alpha_mlm (q_j - [j = label])), written in the
   student's dtype (into the student buffer itself in in-place mode).

So each input row is read once and the gradient written once: 3 N V elements of traffic.
Loads are widened to fp32 at once (the interpreter's bf16 arithmetic is wrong otherwise).
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from kdfast.ops.gpu_resources import register_cap


@triton.jit
def zero_row(g_row, V, BLOCK_V: tl.constexpr):
    """Write zeros over a row of V gradient entries (an uncounted row), BLOCK_V at a time."""
    offs = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        tl.store(g_row + start + offs, tl.zeros([BLOCK_V], tl.float32).to(g_row.dtype.element_ty),
                 mask=start + offs < V)


@triton.jit
def _finite_or_zero(m):
    """A chunk maximum to centre on: 0 for a chunk that is all -inf (its sums are 0 then)."""
    return tl.where(m == -float("inf"), 0.0, m)


@triton.jit
def _row_stats(s, t, valid, inv_t, SOFT_CE: tl.constexpr, NEED_T1: tl.constexpr):
    """Max / sum-exp statistics of one chunk (masked entries are -inf in s and t). ``acc`` is
    centred on the chunk's maxima: sum e^{y - m_t} ((y - m_t) - (x - m_s)) (or -(x - m_s)), so no
    max / T of 1e4 or 1e6 cancels in the loss."""
    x = s * inv_t
    y = t * inv_t
    m_s = tl.max(x, axis=0)
    xc = x - _finite_or_zero(m_s)  # a chunk may be all -inf: no -inf - (-inf)
    z_s = tl.sum(tl.exp(xc), axis=0)
    m_t = tl.max(y, axis=0)
    yc = y - _finite_or_zero(m_t)
    e_t = tl.exp(yc)
    z_t = tl.sum(e_t, axis=0)
    # e_t == 0 (t = -inf, or a padding lane) adds nothing, not 0 * inf
    if SOFT_CE:
        acc = tl.sum(tl.where(e_t > 0, -e_t * xc, 0.0), axis=0)
    else:
        acc = tl.sum(tl.where(e_t > 0, e_t * (yc - xc), 0.0), axis=0)
    if NEED_T1:
        m_1 = tl.max(s, axis=0)
        z_1 = tl.sum(tl.exp(s - _finite_or_zero(m_1)), axis=0)
    else:
        m_1 = m_s
        z_1 = z_s
    return m_s, z_s, m_t, z_t, acc, m_1, z_1


@triton.jit
def _recentre(acc, z_t, m_s, m_t, new_m_s, new_m_t, SOFT_CE: tl.constexpr):
    """A chunk's centred ``acc`` re-expressed on the row's new maxima (0 for an empty part)."""
    if SOFT_CE:
        shift = new_m_s - m_s
    else:
        shift = (m_t - new_m_t) - (m_s - new_m_s)
    scale = tl.exp(m_t - new_m_t)
    # scale == 0: the part's teacher mass vanishes next to the new maximum (its shift may be huge)
    return tl.where((z_t > 0) & (scale > 0), scale * (acc + z_t * shift), 0.0)


@triton.jit
def log1p_accurate(z):
    """log(1 + z) without losing z's digits when |z| is small (Goldberg's form; no log1p in tl)."""
    w = 1.0 + z
    return tl.where(w == 1.0, z, tl.log(w) * (z / tl.where(w == 1.0, 1.0, w - 1.0)))


@triton.jit
def _small_kl_sums(s, t, inv_t, r_s, r_t, log_zs, log_zt, c):
    """(a, b, Q_out) of a chunk for the small-KL form (csrc/common/kd_math.h): over the teacher's
    support (p > 0) a = sum p u, b = sum p phi(u), u = d - c with d = ((t - s) - (r_t - r_s)) / T
    (r: the raw row maxima; kd_centred_diff picks how to form it), phi(u) = e^{-u} - 1 + u by a
    series where it would cancel (|u| <= 1/2); Q_out = the student's mass off the support.
    Differences are taken before the division by T, so each rounds once, on the small result."""
    xc = (s - r_s) * inv_t
    yc = (t - r_t) * inv_t
    direct = (t - s) * inv_t
    dm = (r_t - r_s) * inv_t
    close = (tl.abs(direct) + tl.abs(dm)) <= (tl.abs(yc) + tl.abs(xc))
    d = tl.where(close, direct - dm, yc - xc)
    log_p = yc - log_zt
    p = tl.exp(log_p)
    u = d - c
    nu = -u
    poly = 1.0 / 3628800.0
    poly = poly * nu + 1.0 / 362880.0
    poly = poly * nu + 1.0 / 40320.0
    poly = poly * nu + 1.0 / 5040.0
    poly = poly * nu + 1.0 / 720.0
    poly = poly * nu + 1.0 / 120.0
    poly = poly * nu + 1.0 / 24.0
    poly = poly * nu + 1.0 / 6.0
    poly = poly * nu + 0.5
    small = (u <= 0.5) & (u >= -0.5)
    p_phi = tl.where(small, p * u * u * poly, tl.exp(log_p - u) - p + p * u)
    live = p > 0  # the support: where p does not underflow (t = -inf, finfo.min masks)
    q_out = tl.where(live, 0.0, tl.exp(xc - log_zs))
    return (tl.sum(tl.where(live, p * u, 0.0), axis=0), tl.sum(tl.where(live, p_phi, 0.0), axis=0),
            tl.sum(q_out, axis=0))


@triton.jit
def _merge_max_sum(m_a, z_a, m_b, z_b):
    """Combine two (max, sum e^{. - max}) pairs of disjoint parts of a row."""
    m = tl.maximum(m_a, m_b)
    # an empty part (z == 0, m == -inf) adds nothing, also when both are empty (exp(-inf + inf))
    return m, tl.where(z_a > 0, z_a * tl.exp(m_a - m), 0.0) + tl.where(z_b > 0, z_b * tl.exp(m_b - m), 0.0)


@triton.jit
def _grad_chunk(s, t, offs, label, inv_t, lse_s, lse_t, lse_1, coef_kd, coef_mlm, HAS_MLM: tl.constexpr):
    """d loss / d s for one chunk: coef_kd (p_s - p_t) + coef_mlm (q - onehot(label))."""
    g = coef_kd * (tl.exp(s * inv_t - lse_s) - tl.exp(t * inv_t - lse_t))
    if HAS_MLM:
        g += coef_mlm * (tl.exp(s - lse_1) - tl.where(offs == label, 1.0, 0.0))
    return g


@triton.jit
def row_mlm(labels_ptr, mw_ptr, row, w, alpha_mlm, HAS_MLM: tl.constexpr, MLM_WEIGHT: tl.constexpr):
    """(alpha_mlm of the row relative to its weight w, its label): alpha_mlm m_r / w_r with MLM row
    weights (MLM_WEIGHT), else alpha_mlm; the label is 0 (never read) on a row whose MLM term is 0."""
    a_mlm = alpha_mlm
    if MLM_WEIGHT:
        a_mlm = alpha_mlm * (tl.load(mw_ptr + row).to(tl.float32) / w)
    label = 0
    if HAS_MLM:
        label = tl.where(a_mlm != 0.0, tl.load(labels_ptr + row), 0)
    return a_mlm, label


@triton.jit
def kd_fwd_bwd_kernel(
    s_ptr, s_stride, t_ptr, t_stride, g_ptr, g_stride, labels_ptr, w_ptr, loss_ptr, mw_ptr,
    V, temperature, alpha_kd, alpha_mlm,
    SOFT_CE: tl.constexpr, HAS_MLM: tl.constexpr, NEED_T1: tl.constexpr, BLOCK_V: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr, MLM_WEIGHT: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
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
        if SINGLE_BLOCK:
            valid = offs < V
            s = tl.load(s_row + offs, mask=valid, other=-float("inf")).to(tl.float32)
            t = tl.load(t_row + offs, mask=valid, other=-float("inf")).to(tl.float32)
            m_s, z_s, m_t, z_t, acc, m_1, z_1 = _row_stats(s, t, valid, inv_t, SOFT_CE, NEED_T1)
            r_s = tl.max(s, axis=0)
            r_t = tl.max(t, axis=0)
        else:
            r_s = -float("inf")
            r_t = -float("inf")
            m_s = -float("inf")
            z_s = 0.0
            m_t = -float("inf")
            z_t = 0.0
            acc = 0.0
            m_1 = -float("inf")
            z_1 = 0.0
            for start in range(0, V, BLOCK_V):
                valid = start + offs < V
                s_c = tl.load(s_row + start + offs, mask=valid, other=-float("inf")).to(tl.float32)
                t_c = tl.load(t_row + start + offs, mask=valid, other=-float("inf")).to(tl.float32)
                cm_s, cz_s, cm_t, cz_t, c_acc, cm_1, cz_1 = _row_stats(s_c, t_c, valid, inv_t, SOFT_CE, NEED_T1)
                r_s = tl.maximum(r_s, tl.max(s_c, axis=0))
                r_t = tl.maximum(r_t, tl.max(t_c, axis=0))
                new_m_s = tl.maximum(m_s, cm_s)
                new_m_t = tl.maximum(m_t, cm_t)
                acc = _recentre(acc, z_t, m_s, m_t, new_m_s, new_m_t, SOFT_CE) + \
                    _recentre(c_acc, cz_t, cm_s, cm_t, new_m_s, new_m_t, SOFT_CE)
                m_s, z_s = _merge_max_sum(m_s, z_s, cm_s, cz_s)
                m_t, z_t = _merge_max_sum(m_t, z_t, cm_t, cz_t)
                m_1, z_1 = _merge_max_sum(m_1, z_1, cm_1, cz_1)

        log_zs = tl.log(z_s)
        log_zt = tl.log(z_t)
        lse_s = m_s + log_zs
        lse_t = m_t + log_zt
        lse_1 = m_1 + tl.log(z_1)  # equals lse_s when T == 1 (NEED_T1 off)
        kd = acc / z_t + log_zs  # centred: the maxima cancel exactly
        if not SOFT_CE:
            kd -= log_zt
            if kd < 1.0:  # kKdStableBelow: recompute in the small-KL form (no cancellation at large T)
                # c = E_p[d] on the raw maxima' centring (its rounding only enters at second order)
                c = acc / z_t - ((r_t - r_s) * inv_t - (m_t - m_s))
                if SINGLE_BLOCK:
                    a, b, q_out = _small_kl_sums(s, t, inv_t, r_s, r_t, log_zs, log_zt, c)
                else:
                    a = 0.0
                    b = 0.0
                    q_out = 0.0
                    for start in range(0, V, BLOCK_V):
                        valid = start + offs < V
                        s_c = tl.load(s_row + start + offs, mask=valid, other=-float("inf")).to(tl.float32)
                        t_c = tl.load(t_row + start + offs, mask=valid, other=-float("inf")).to(tl.float32)
                        ca, cb, cq = _small_kl_sums(s_c, t_c, inv_t, r_s, r_t, log_zs, log_zt, c)
                        a += ca
                        b += cb
                        q_out += cq
                kd = a + log1p_accurate(b - a) - log1p_accurate(-q_out)
        loss = alpha_kd * temperature * (temperature * kd)
        coef_kd = w * alpha_kd * temperature
        coef_mlm = w * a_mlm
        if HAS_MLM:
            # read before the gradient (possibly written over the student row) is stored
            loss += a_mlm * (lse_1 - tl.load(s_row + label).to(tl.float32))
        tl.store(loss_ptr + row, w * loss)

        if SINGLE_BLOCK:
            g = _grad_chunk(s, t, offs, label, inv_t, lse_s, lse_t, lse_1, coef_kd, coef_mlm, HAS_MLM)
            tl.store(g_row + offs, g.to(g_ptr.dtype.element_ty), mask=valid)
        else:
            for start in range(0, V, BLOCK_V):
                valid = start + offs < V
                s_c = tl.load(s_row + start + offs, mask=valid, other=0.0).to(tl.float32)
                t_c = tl.load(t_row + start + offs, mask=valid, other=0.0).to(tl.float32)
                g = _grad_chunk(s_c, t_c, start + offs, label, inv_t, lse_s, lse_t, lse_1, coef_kd, coef_mlm,
                                HAS_MLM)
                tl.store(g_row + start + offs, g.to(g_ptr.dtype.element_ty), mask=valid)


# The chunk of a row on the GPU, and the largest row kept whole in registers. A chunk of 8,192 is 16 fp32
# values of the student row and 16 of the teacher row per thread at 16 warps (512 threads, so up to 128
# registers each); at 16,384 it needs 32 warps (1,024 threads, 64 registers each), and ptxas -v
# (kdfast.ops.aot --report) showed every variant spilling 88-650 B per thread. The kernels launch with
# maxnreg = register_cap(num_warps): without it ptxas held the 16-warp block to 64 registers, two blocks
# per SM, and spilled 8-32 B per thread in the chunked variants; with it they take 72-128 registers and
# one block of 16 warps per SM, spilling nothing. A row kept whole holds its values through the loss
# and the gradient: at 8,192 (16 warps, 128 registers) the half-precision KL variant still spilled 4 B
# per thread on sm_90, and at 32 warps (64 registers) five fp32 variants did; at 4,096 (8 warps, up to
# 255 registers) none does. So on the GPU a row up to 4,096 is kept whole and a longer one (BERT's
# 30,522) is folded in chunks of 8,192, one chunk for rows of 4,097-8,192 (read once more for the
# gradient). The interpreter (CPU tensors) is fastest with the whole row in one block.
MAX_BLOCK_V_GPU = 8192
MAX_SINGLE_BLOCK_V_GPU = 4096
MAX_BLOCK_V_INTERPRETER = 32768


def _num_warps(block_v: int) -> int:
    return 16 if block_v >= 8192 else 8 if block_v >= 2048 else 4


def row_block_meta(V: int, cuda: bool, block_v: int | None = None) -> dict:
    """``BLOCK_V``, ``SINGLE_BLOCK``, ``num_warps`` and ``maxnreg`` of a one-program-per-row kernel over rows
    of ``V``: on a GPU the whole row in one block up to MAX_SINGLE_BLOCK_V_GPU, else chunks of
    MAX_BLOCK_V_GPU; on the interpreter the whole row up to MAX_BLOCK_V_INTERPRETER, else chunks of it.
    ``block_v`` overrides the block (tests use it to exercise the chunked path). ``maxnreg`` is
    :func:`~kdfast.ops.gpu_resources.register_cap` of the warps (the interpreter ignores it)."""
    if block_v:
        bv = block_v
    elif not cuda:
        bv = min(triton.next_power_of_2(V), MAX_BLOCK_V_INTERPRETER)
    else:
        bv = triton.next_power_of_2(V) if V <= MAX_SINGLE_BLOCK_V_GPU else MAX_BLOCK_V_GPU
    warps = _num_warps(bv)
    return dict(BLOCK_V=bv, SINGLE_BLOCK=bv >= V and (not cuda or block_v is not None or bv <= MAX_SINGLE_BLOCK_V_GPU),
                num_warps=warps, maxnreg=register_cap(warps))


def launch_options(meta: dict) -> dict:
    """The Triton launch options (``num_warps``, ``maxnreg``) of a :func:`row_block_meta` result, as an
    ``AOT_CONFIGS`` entry names them."""
    return {k: meta[k] for k in ("num_warps", "maxnreg")}


def kd_fwd_bwd_triton(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    row_weight: torch.Tensor,
    grad: torch.Tensor,
    temperature: float,
    alpha_kd: float,
    alpha_mlm: float,
    soft_ce: bool,
    block_v: int | None = None,
    mlm_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch :func:`kd_fwd_bwd_kernel` on 2-D [N, V] inputs (unit column stride).

    Returns the weighted loss rows (float32) and writes the gradient into ``grad``.
    ``block_v`` overrides the block size (tests use it to exercise the chunked path);
    ``mlm_weight`` [N] float32 weights the MLM term per row (the package contract).
    """
    N, V = student.shape
    loss_rows = torch.empty(N, dtype=torch.float32, device=student.device)
    if N == 0:
        return loss_rows
    kd_fwd_bwd_kernel[(N,)](
        student, student.stride(0), teacher, teacher.stride(0), grad, grad.stride(0), labels, row_weight, loss_rows,
        row_weight if mlm_weight is None else mlm_weight,
        V, float(temperature), float(alpha_kd), float(alpha_mlm),
        SOFT_CE=bool(soft_ce), HAS_MLM=alpha_mlm != 0, NEED_T1=alpha_mlm != 0 and temperature != 1,
        MLM_WEIGHT=mlm_weight is not None and alpha_mlm != 0, **row_block_meta(V, student.is_cuda, block_v),
    )
    return loss_rows


def aot_configs():
    """Every constexpr combination the launcher can pick, per logit dtype, at the largest block of each
    path, whole (MAX_SINGLE_BLOCK_V_GPU) and chunked (MAX_BLOCK_V_GPU) (for kdfast.ops.aot). A smaller block
    (:func:`row_block_meta`) holds no more values per thread with no fewer registers available to each (as
    many warps or fewer), so it needs no more registers."""
    for dtype, soft_ce, (has_mlm, need_t1, mlm_weight), single in itertools.product(
        ("fp32", "fp16", "bf16"), (False, True),
        ((False, False, False), (True, False, False), (True, True, False), (True, False, True), (True, True, True)),
        (True, False),
    ):
        bv = MAX_SINGLE_BLOCK_V_GPU if single else MAX_BLOCK_V_GPU
        signature = {
            "s_ptr": f"*{dtype}", "s_stride": "i64", "t_ptr": f"*{dtype}", "t_stride": "i64",
            "g_ptr": f"*{dtype}", "g_stride": "i64", "labels_ptr": "*i64", "w_ptr": "*fp32", "loss_ptr": "*fp32",
            "mw_ptr": "*fp32", "V": "i32", "temperature": "fp32", "alpha_kd": "fp32", "alpha_mlm": "fp32",
        }
        constexprs = {"SOFT_CE": soft_ce, "HAS_MLM": has_mlm, "NEED_T1": need_t1, "BLOCK_V": bv,
                      "SINGLE_BLOCK": single, "MLM_WEIGHT": mlm_weight}
        yield kd_fwd_bwd_kernel, signature, constexprs, launch_options(row_block_meta(bv, cuda=True))


AOT_CONFIGS = aot_configs
