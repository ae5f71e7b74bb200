r"""Kernel family ``sparse_kd``: KD from a sparse teacher (top-k + rest bucket, or sampled ids) + MLM.

Op ``sparse_kd_rows`` (the contract every backend implements)::

    fn(student [N, V], ids [N, K] int64, values [N, K], teacher_lse [N] or None, labels [N] int64,
       row_weight [N], grad [N, V], temperature, alpha_kd, alpha_mlm, sampled, mlm_weight=None) -> loss_rows [N]

``ids`` lie in [0, V) on every row (the caller gives uncounted rows in-range ids). Per row r with
w_r != 0, x = s / T, lse_s = logsumexp(x), p_s,j = e^{x_j - lse_s}:

**top-k** (``sampled=False``; distinct ids, values = raw teacher logits): y_k = v_k / T,
lse_K = logsumexp_k y_k, lse_t = max(teacher_lse, lse_K) (lse_K without ``teacher_lse`` or when
K = V), p_t,k = e^{y_k - lse_t}, teacher rest mass p_r = -expm1(lse_K - lse_t), student rest mass
P_r = e^{lse_R - lse_s} (lse_R = logsumexp of x outside the kept ids):

    kd = sum_k p_t,k (log p_t,k - log p_s,k) + p_r (log p_r - log P_r)          (0 log 0 = 0)
    d kd / dx_j = p_s,j - p_t,j  (j kept),   p_s,j - p_r e^{x_j - lse_R}  (j not kept)

**sampled** (``sampled=True``; values = non-negative counts / weights c_k, duplicates summed):
q_j = sum_{k: id_k = j} c_k / sum_k c_k,

    kd = sum_j q_j (log q_j - log p_s,j)      d kd / dx_j = p_s,j - q_j

Both, with m = ``mlm_weight`` (``row_weight`` when None): loss_r = w_r alpha_kd T^2 kd +
m_r alpha_mlm (logsumexp(s) - s[label_r]) and grad_r,j = w_r alpha_kd T d kd / dx_j +
m_r alpha_mlm (softmax(s)_j - [j = label_r]), written into ``grad`` in the student's dtype; loss
rows float32 (float64 for float64 students on torch). Rows with w_r = 0 are not read (loss 0,
gradient 0, whatever m_r); labels are read where alpha_mlm m_r != 0 only.

Where each backend lives:

- ``torch``: :mod:`kdfast.ops.sparse_kd.eager` (eager PyTorch, any device and float dtype);
- ``triton``: :mod:`kdfast.ops.sparse_kd.triton` (one program per row, float32 math), wrapped here as
  the ``torch.library`` op ``kdfast::sparse_kd_fwd_bwd_triton`` with its fake.

No compiled C++ kernel yet. What users call is :func:`kdfast.sparse_kd_loss`
(``kdfast/losses/sparse_kd.py``: validation, stored forms, row selection, autograd), and
:func:`kdfast.fused_linear_kd_loss` with ``teacher_sparse``. Importing this package registers the
implementations with :mod:`kdfast.ops.registry`; it does not import triton.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdfast.ops.registry import register
from kdfast.ops.sparse_kd.eager import sparse_kd_rows_torch

OP = "sparse_kd_rows"


@torch.library.custom_op("kdfast::sparse_kd_fwd_bwd_triton", mutates_args=("grad",))
def _sparse_kd_fwd_bwd_triton(student: Tensor, ids: Tensor, values: Tensor, teacher_lse: Tensor, labels: Tensor,
                              row_weight: Tensor, grad: Tensor, temperature: float, alpha_kd: float,
                              alpha_mlm: float, sampled: bool, has_lse: bool, mlm_weight: Tensor | None = None) -> Tensor:
    from kdfast.ops.sparse_kd.triton import sparse_kd_fwd_bwd_triton

    return sparse_kd_fwd_bwd_triton(student, ids, values, teacher_lse if has_lse else None, labels, row_weight,
                                    grad, temperature, alpha_kd, alpha_mlm, sampled, mlm_weight=mlm_weight)


@_sparse_kd_fwd_bwd_triton.register_fake
def _(student, ids, values, teacher_lse, labels, row_weight, grad, temperature, alpha_kd, alpha_mlm, sampled,
      has_lse, mlm_weight=None):
    return student.new_empty(student.shape[0], dtype=torch.float32)


def sparse_kd_rows_triton(student: Tensor, ids: Tensor, values: Tensor, teacher_lse: Tensor | None, labels: Tensor,
                          row_weight: Tensor, grad: Tensor, temperature: float, alpha_kd: float, alpha_mlm: float,
                          sampled: bool, mlm_weight: Tensor | None = None) -> Tensor:
    """``sparse_kd_rows`` on the Triton kernel (a custom op takes no optional tensor: ``has_lse`` says
    whether ``teacher_lse`` is real)."""
    has_lse = teacher_lse is not None
    lse = teacher_lse if has_lse else row_weight  # any float tensor: not read
    return _sparse_kd_fwd_bwd_triton(student, ids, values, lse, labels, row_weight, grad, temperature, alpha_kd,
                                     alpha_mlm, sampled, has_lse, mlm_weight)


register(OP, "torch", sparse_kd_rows_torch)
register(OP, "triton", sparse_kd_rows_triton, aot_configs="kdfast.ops.sparse_kd.triton:AOT_CONFIGS")

__all__ = ["OP", "sparse_kd_rows_torch", "sparse_kd_rows_triton"]
