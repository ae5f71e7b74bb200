"""Fused distillation losses, one module per family."""

from kdfast.losses.attention import (
    attention_kl_loss,
    attention_mse_loss,
    flash_attention_transfer,
    map_teacher_heads,
    minilm_relation_loss,
    split_relation_heads,
)
from kdfast.losses.distillation import DistillationLoss
from kdfast.losses.fused_linear_kd import FusedLinearKDLoss, fused_linear_kd_loss
from kdfast.losses.hidden import HiddenMSELoss, cosine_loss, feature_map_loss, hidden_mse_loss
from kdfast.losses.kd import KDLoss, kd_loss
from kdfast.losses.sparse_kd import SparseKDLoss, sparse_kd_loss, sparsify_teacher_logits

# The registered op (kdfast.ops.registry) that each public loss runs: what reports resolve to say
# where each term ran. "fused_linear_kd_loss[sparse]" is that loss fed a cached sparse teacher.
LOSS_OPS = {
    "kd_loss": "kd_rows",
    "fused_linear_kd_loss": "kd_rows",
    "sparse_kd_loss": "sparse_kd_rows",
    "fused_linear_kd_loss[sparse]": "sparse_kd_rows",
    "attention_kl_loss": "attention_kl_maps",
    "attention_mse_loss": "score_mse_fwd",
    "flash_attention_transfer": "attention_transfer",
    "hidden_mse_loss": "hidden_mse_epilogue",
    "cosine_loss": "cosine_rows",
    "feature_map_loss": "feature_map",
}

__all__ = [
    "DistillationLoss", "FusedLinearKDLoss", "HiddenMSELoss", "KDLoss", "SparseKDLoss", "attention_kl_loss",
    "attention_mse_loss", "cosine_loss", "feature_map_loss", "flash_attention_transfer", "fused_linear_kd_loss",
    "hidden_mse_loss", "kd_loss", "map_teacher_heads", "minilm_relation_loss", "split_relation_heads", "sparse_kd_loss",
    "sparsify_teacher_logits",
]
