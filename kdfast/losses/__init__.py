"""Fused distillation losses, one module per family."""

from kdfast.losses.attention import attention_kl_loss, attention_mse_loss, flash_attention_transfer
from kdfast.losses.fused_linear_kd import FusedLinearKDLoss, fused_linear_kd_loss
from kdfast.losses.kd import KDLoss, kd_loss
from kdfast.losses.sparse_kd import SparseKDLoss, sparse_kd_loss, sparsify_teacher_logits

__all__ = ["FusedLinearKDLoss", "KDLoss", "SparseKDLoss", "attention_kl_loss", "attention_mse_loss",
           "flash_attention_transfer", "fused_linear_kd_loss", "kd_loss",
           "sparse_kd_loss", "sparsify_teacher_logits"]
