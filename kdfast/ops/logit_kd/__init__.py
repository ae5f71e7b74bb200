r"""Kernel family ``logit_kd``: temperature KD + MLM over logit rows, loss and gradient in one pass.

Op ``kd_rows`` (the contract every backend implements)::

    fn(student [N, V], teacher [N, V], labels [N] int64, row_weight [N], grad [N, V],
       temperature, alpha_kd, alpha_mlm, soft_ce, mlm_weight=None) -> loss_rows [N]

For a row r with weight w_r != 0, student logits s, teacher logits t, T = temperature,
p = softmax(t / T), q = softmax(s / T), and MLM weight m_r (``mlm_weight``; m = w when None):

    kl:      kd_r = sum_j p_j (log p_j - log q_j)          soft_ce: kd_r = -sum_j p_j log q_j
    ce_r     = logsumexp(s) - s[label_r]                    (hard-label MLM cross-entropy, T = 1)
    loss_r   = w_r alpha_kd T^2 kd_r + m_r alpha_mlm ce_r
    grad_r,j = w_r alpha_kd T (q_j - p_j) + m_r alpha_mlm (softmax(s)_j - [j = label_r])

written into ``grad`` (which may be ``student`` itself: in-place mode), in the student's dtype;
the loss rows are float32 (float64 for float64 inputs on the torch / C++ backends). A row with
w_r = 0 is never read: loss 0, gradient 0, whatever m_r (so KD on every row plus MLM on the
labelled ones is one pass: m nonzero on a subset of the rows where w is). ``labels`` are read only
when alpha_mlm != 0, and must then lie in [0, V) on every row with w_r != 0 and m_r != 0 (the
losses check or drop them). A row whose KL is
below 1 is recomputed without cancellation as E_p[u] + log1p(E_p[e^{-u} - 1 + u] - E_p[u]),
u = d - E_p[d], d = (t - s) / T (``csrc/common/kd_math.h``).

Where each backend lives:

- ``torch``: :mod:`kdfast.ops.logit_kd.eager` (eager PyTorch, any device, any float dtype);
- ``triton``: :mod:`kdfast.ops.logit_kd.triton` (one program per row; float32 math, so no float64),
  wrapped here as the ``torch.library`` op ``kdfast::kd_fwd_bwd_triton`` with its fake;
- ``cpu`` / ``cuda``: the compiled op ``torch.ops.kdfast.kd_fwd_bwd``, whose fake is registered here.
  Its C++ mirrors this package: ``csrc/ops/logit_kd/cpu.cpp`` (schema, CPU kernel on the row
  helpers of ``csrc/common/rows_cpu.h``), ``cuda.cu`` (the kernel, behind a plain C launcher),
  ``cuda_host.cpp`` (its dispatcher entry), ``kd_args.h`` (the argument checks, which raise
  ``ValueError``); the row math both share is ``csrc/common/kd_math.h``.

What users call, with validation, row selection (``kd_rows``) and autograd, is
:func:`kdfast.kd_loss` (``kdfast/losses/kd.py``); :func:`kdfast.fused_linear_kd_loss` runs the same
op on chunks of projected logits. Importing this package registers the implementations with
:mod:`kdfast.ops.registry`; it does not import triton.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdfast.backend import _extension
from kdfast.ops.dtypes import acc_dtype
from kdfast.ops.logit_kd.eager import kd_rows_torch
from kdfast.ops.registry import register

OP = "kd_rows"

if _extension()[0] is not None:

    @torch.library.register_fake("kdfast::kd_fwd_bwd")
    def _kd_fwd_bwd_fake(student, teacher, labels, row_weight, grad, temperature, alpha_kd, alpha_mlm, soft_ce,
                         cuda_stream=0, mlm_weight=None):
        return student.new_empty(student.shape[0], dtype=acc_dtype(student.dtype))


@torch.library.custom_op("kdfast::kd_fwd_bwd_triton", mutates_args=("grad",))
def kd_rows_triton(student: Tensor, teacher: Tensor, labels: Tensor, row_weight: Tensor, grad: Tensor,
                   temperature: float, alpha_kd: float, alpha_mlm: float, soft_ce: bool,
                   mlm_weight: Tensor | None = None) -> Tensor:
    """``kd_rows`` on the Triton kernel (:func:`kdfast.ops.logit_kd.triton.kd_fwd_bwd_triton`)."""
    from kdfast.ops.logit_kd.triton import kd_fwd_bwd_triton

    return kd_fwd_bwd_triton(student, teacher, labels, row_weight, grad, temperature, alpha_kd, alpha_mlm, soft_ce,
                             mlm_weight=mlm_weight)


@kd_rows_triton.register_fake
def _(student, teacher, labels, row_weight, grad, temperature, alpha_kd, alpha_mlm, soft_ce, mlm_weight=None):
    return student.new_empty(student.shape[0], dtype=torch.float32)


def kd_rows_compiled(student: Tensor, teacher: Tensor, labels: Tensor, row_weight: Tensor, grad: Tensor,
                     temperature: float, alpha_kd: float, alpha_mlm: float, soft_ce: bool,
                     mlm_weight: Tensor | None = None) -> Tensor:
    """``kd_rows`` on the compiled C++ op of the tensors' device (CPU, or CUDA on the current stream)."""
    stream = torch.cuda.current_stream(student.device).cuda_stream if student.device.type == "cuda" else 0
    return torch.ops.kdfast.kd_fwd_bwd(student, teacher, labels, row_weight, grad, temperature, alpha_kd,
                                        alpha_mlm, soft_ce, stream, mlm_weight)


register(OP, "torch", kd_rows_torch)
register(OP, "triton", kd_rows_triton, aot_configs="kdfast.ops.logit_kd.triton:AOT_CONFIGS")
register(OP, "cpu", kd_rows_compiled)
register(OP, "cuda", kd_rows_compiled)

__all__ = ["OP", "kd_rows_compiled", "kd_rows_torch", "kd_rows_triton"]
