"""Fused distillation losses, one module per family."""

from kdfast.losses.kd import KDLoss, kd_loss
from kdfast.losses.sparse_kd import SparseKDLoss, sparse_kd_loss, sparsify_teacher_logits

__all__ = ["KDLoss", "SparseKDLoss", "kd_loss", "sparse_kd_loss", "sparsify_teacher_logits"]
