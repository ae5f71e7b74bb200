"""kdfast: compiled-kernel knowledge distillation for BERT-family models.

    import kdfast
    loss = kdfast.kd_loss(student_logits, teacher_logits, temperature=2.0, labels=labels, alpha_mlm=0.4)
    kdfast.backends()   # which backends are built and usable here, and why not
"""

from kdfast.capture import Captured, capture
from kdfast.losses import (
    DistillationLoss,
    FusedLinearKDLoss,
    HiddenMSELoss,
    KDLoss,
    SparseKDLoss,
    attention_kl_loss,
    attention_mse_loss,
    cosine_loss,
    feature_map_loss,
    flash_attention_transfer,
    fused_linear_kd_loss,
    hidden_mse_loss,
    kd_loss,
    minilm_relation_loss,
    sparse_kd_loss,
    sparsify_teacher_logits,
)
from kdfast.losses._checks import set_value_checks  # noqa: F401  (the GPU host-sync switch, README)
from kdfast.ops.registry import backends

__version__ = "0.1.0"
__all__ = [
    "Captured", "DistillationLoss", "FusedLinearKDLoss", "HiddenMSELoss", "KDLoss", "SparseKDLoss", "attention_kl_loss",
    "attention_mse_loss", "backends", "capture", "cosine_loss", "feature_map_loss", "flash_attention_transfer",
    "fused_linear_kd_loss", "hidden_mse_loss", "kd_loss", "minilm_relation_loss", "sparse_kd_loss",
    "sparsify_teacher_logits", "__version__",
]
