"""The hand-written side of the end-to-end benchmark (:mod:`kdfast.bench.e2e`): each recipe's
objective written the way the original scripts and today's users write it, on ``transformers``
models (full logits, ``KLDivLoss``, materialised attention maps), the TextBrewer step, and the
plain training step around them with the recipe stage's optimizer, lr and clipping."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)


def compiled(loss_fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """``torch.compile(loss_fn)`` (it compiles on its first call, step 0); where torch.compile itself
    refuses (e.g. a Python it does not support), a function that raises that error, so that the row
    reports it instead of the suite stopping."""
    try:
        return torch.compile(loss_fn)
    except Exception as ex:
        error = ex

        def refused() -> torch.Tensor:
            raise error

        return refused


def plain_step(loss_fn: Callable[[], torch.Tensor], params: list, stage, device: torch.device,
                dtype: torch.dtype, *, compile_: bool = False) -> Callable[[], torch.Tensor]:
    """A training step around ``loss_fn`` with the recipe stage's optimizer class, lr and clipping."""
    from kdfast.train.optim import OPTIMIZERS

    cfg = stage.config
    params = [p for p in params if p.requires_grad]
    opt = OPTIMIZERS[cfg.optimizer](params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    forward = compiled(loss_fn) if compile_ else loss_fn

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=False)
        with autocast(device, dtype):
            loss = forward()
        loss.backward()
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        return loss.detach()

    return step


# ---- hand-written objectives ------------------------------------------------------------------

def kl_batchmean(s_logits: torch.Tensor, t_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The original scripts' KD: KLDivLoss(batchmean)(log_softmax(s / T), softmax(t / T)) * T^2."""
    return nn.KLDivLoss(reduction="batchmean")(F.log_softmax(s_logits / temperature, dim=-1),
                                               F.softmax(t_logits / temperature, dim=-1)) * temperature ** 2


def distilbert_loss(student, teacher, batch: dict, cfg, masked_only: bool) -> Callable[[], torch.Tensor]:
    ids, am, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]

    def loss_fn() -> torch.Tensor:
        s = student(input_ids=ids, attention_mask=am, output_hidden_states=True)
        with torch.no_grad():
            t = teacher(input_ids=ids, attention_mask=am, output_hidden_states=True)
        rows = labels != -100 if masked_only else am.bool()
        vocab = s.logits.shape[-1]
        loss = cfg.alpha_kd * kl_batchmean(s.logits[rows].view(-1, vocab), t.logits[rows].view(-1, vocab),
                                            cfg.temperature)
        loss = loss + cfg.alpha_mlm * nn.CrossEntropyLoss(ignore_index=-100)(s.logits.view(-1, vocab), labels.view(-1))
        real = am.bool()
        s_h, t_h = s.hidden_states[-1][real], t.hidden_states[-1][real]
        return loss + cfg.alpha_cos * nn.CosineEmbeddingLoss()(s_h, t_h, s_h.new_ones(s_h.shape[0]))

    return loss_fn


class ScoresBert(nn.Module):
    """A ``transformers`` BERT that also returns every layer's pre-softmax attention scores
    q k^T / sqrt(dh) + the additive mask, [B, H, L, L] (what TinyBERT's modified BERT returns),
    from hooks on the query and key projections."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert
        self._q: list = []
        self._k: list = []
        for layer in bert.encoder.layer:
            layer.attention.self.query.register_forward_hook(lambda m, a, y: self._q.append(y))
            layer.attention.self.key.register_forward_hook(lambda m, a, y: self._k.append(y))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        self._q, self._k = [], []
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        heads = self.bert.config.num_attention_heads
        additive = (1.0 - attention_mask[:, None, None, :].to(out.hidden_states[0].dtype)) * -10000.0
        scores = []
        for q, k in zip(self._q, self._k):
            b, length, d = q.shape
            q = q.view(b, length, heads, d // heads).transpose(1, 2)
            k = k.view(b, length, heads, d // heads).transpose(1, 2)
            scores.append(q @ k.transpose(-1, -2) * (d // heads) ** -0.5 + additive)
        return {"hidden_states": out.hidden_states, "scores": scores, "inputs_mask": attention_mask}


#: the name :func:`register_scores_attention` gives transformers' eager attention that returns its scores
SCORES_ATTENTION = "eager_scores"


def eager_scores_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                           **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``eager_attention_forward`` (softmax in fp32, or in fp64 for fp64 inputs; dropout,
    probabilities x values) returning the pre-softmax scores s = q k^T * scaling + mask as its
    attention weights."""
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = F.softmax(scores, dim=-1, dtype=torch.promote_types(query.dtype, torch.float32)).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), scores


def register_scores_attention() -> None:
    """Register :func:`eager_scores_attention` with transformers' attention and mask interfaces as
    :data:`SCORES_ATTENTION` (its mask: the eager attention's additive one)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(SCORES_ATTENTION, eager_scores_attention)
    AttentionMaskInterface.register(SCORES_ATTENTION, eager_mask)


class ScoresModernBert(nn.Module):
    """A ``transformers`` ModernBERT run eagerly with ``output_attentions=True``, whose attention maps
    are every layer's pre-softmax scores q k^T / sqrt(dh) + the additive mask, [B, H, L, L] (what
    TinyBERT's modified BERT returns; transformers' eager attention returns the probabilities): the
    model's attention is set to :data:`SCORES_ATTENTION`, transformers' eager attention function
    returning its scores instead of its probabilities, so a local layer's map holds
    ``finfo.min`` outside its band, as the eager mask adds it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        register_scores_attention()
        self.model = model
        model.set_attn_implementation(SCORES_ATTENTION)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                         output_attentions=True)
        return {"hidden_states": out.hidden_states, "scores": out.attentions, "inputs_mask": attention_mask}


def tinybert_attention_mse(s_att: torch.Tensor, t_att: torch.Tensor, mean_over: str = "all") -> torch.Tensor:
    """TinyBERT's attention MSE on score maps: masked scores (<= -1e2) set to 0 on both sides, then
    the mean over every entry (``"all"``: TinyBERT's ``MSELoss``) or over the teacher's unmasked
    entries (``"kept"``: a local layer's band, as kdfast's windowed loss defines it; the same as
    ``"all"`` for a global layer without padding)."""
    if mean_over not in ("all", "kept"):
        raise ValueError(f"mean_over must be 'all' or 'kept', got {mean_over!r}")
    kept = t_att > -1e2
    s_att = torch.where(s_att <= -1e2, torch.zeros_like(s_att), s_att)
    t_att = torch.where(kept, t_att, torch.zeros_like(t_att))
    if mean_over == "all":
        return F.mse_loss(s_att, t_att)
    return F.mse_loss(s_att, t_att, reduction="sum") / kept.sum()


def tinybert_loss(student: nn.Module, teacher: nn.Module, projections: nn.ModuleDict, layer_map: dict,
                  batch: dict, cfg, mean_over: str = "all") -> Callable[[], torch.Tensor]:
    """TinyBERT's general-distillation loss on :class:`ScoresBert` / :class:`ScoresModernBert`
    outputs: hidden states through the projections with ``MSELoss``, plus
    :func:`tinybert_attention_mse` (``mean_over``) on every mapped layer's score maps, each term
    summed over the layer map and weighted by ``cfg.alpha_hidden`` / ``cfg.alpha_attention``."""
    ids, am = batch["input_ids"], batch["attention_mask"]
    mse = nn.MSELoss()

    def loss_fn() -> torch.Tensor:
        s = student(ids, am)
        with torch.no_grad():
            t = teacher(ids, am)
        loss = 0.0
        for m, g in layer_map.items():
            if cfg.alpha_hidden:
                loss = loss + cfg.alpha_hidden * mse(projections[str(m)](s["hidden_states"][m]),
                                                     t["hidden_states"][g])
            if m >= 1 and cfg.alpha_attention:
                loss = loss + cfg.alpha_attention * tinybert_attention_mse(s["scores"][m - 1], t["scores"][g - 1],
                                                                           mean_over)
        return loss

    return loss_fn


def feature_map_mse(hs: torch.Tensor, ht: torch.Tensor) -> torch.Tensor:
    """MobileBERT's feature-map transfer, written out: MSE of the layer-normalised maps plus the
    per-token mean and variance discrepancies (the split the paper reports as more stable)."""
    d = hs.shape[-1]
    loss = F.mse_loss(F.layer_norm(hs, (d,), eps=1e-5), F.layer_norm(ht, (d,), eps=1e-5))
    loss = loss + (hs.mean(-1) - ht.mean(-1)).pow(2).mean()
    return loss + (hs.var(-1, unbiased=False) - ht.var(-1, unbiased=False)).abs().mean()


def mobilebert_pkt_loss(student, teacher, layer: int, batch: dict, pkt) -> Callable[[], torch.Tensor]:
    ids, am = batch["input_ids"], batch["attention_mask"]

    def loss_fn() -> torch.Tensor:
        s = student(input_ids=ids, attention_mask=am, output_hidden_states=True, output_attentions=True)
        with torch.no_grad():
            t = teacher(input_ids=ids, attention_mask=am, output_hidden_states=True, output_attentions=True)
        loss = pkt.alpha_feature_map * feature_map_mse(s.hidden_states[layer], t.hidden_states[layer])
        a_s, a_t = s.attentions[layer - 1], t.attentions[layer - 1]
        b, h, length, _ = a_s.shape
        log_t = a_t.clamp_min(1e-30).log()  # teacher head groups: softmax of their mean log-probabilities
        log_t = F.log_softmax(log_t.view(b, h, -1, length, length).mean(2), dim=-1)
        log_s = a_s.clamp_min(1e-30).log()
        kl = F.kl_div(log_s.reshape(-1, length), log_t.reshape(-1, length), reduction="batchmean", log_target=True)
        return loss + pkt.alpha_attention * kl

    return loss_fn


def mobilebert_pretrain_loss(student, teacher, batch: dict, pre) -> Callable[[], torch.Tensor]:
    ids, am, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]

    def loss_fn() -> torch.Tensor:
        s = student(input_ids=ids, attention_mask=am).logits
        with torch.no_grad():
            t = teacher(input_ids=ids, attention_mask=am).logits
        rows, vocab = labels != -100, s.shape[-1]
        loss = pre.alpha_kd * kl_batchmean(s[rows].view(-1, vocab), t[rows].view(-1, vocab), pre.temperature)
        return loss + pre.alpha_mlm * nn.CrossEntropyLoss(ignore_index=-100)(s.view(-1, vocab), labels.view(-1))

    return loss_fn


def textbrewer_tinybert_step(student: ScoresBert, teacher: ScoresBert, projections: nn.ModuleDict,
                              layer_map: dict, batch: dict, cfg, stage, device, dtype, tmp: Path):
    from textbrewer import DistillationConfig, GeneralDistiller, TrainingConfig

    d_s, d_t = student.bert.config.hidden_size, teacher.bert.config.hidden_size
    matches = [{"layer_T": g, "layer_S": m, "feature": "hidden", "loss": "hidden_mse", "weight": cfg.alpha_hidden,
                "proj": ["linear", d_s, d_t]} for m, g in layer_map.items()]
    matches += [{"layer_T": g - 1, "layer_S": m - 1, "feature": "attention", "loss": "attention_mse",
                 "weight": cfg.alpha_attention} for m, g in layer_map.items() if m >= 1]
    dc = DistillationConfig(temperature=1, hard_label_weight=0, kd_loss_weight=0, intermediate_matches=matches)
    tc = TrainingConfig(device=device, output_dir=str(tmp / "textbrewer"), log_dir=None)

    def adaptor(batch, out):
        return {"hidden": out["hidden_states"], "attention": out["scores"], "inputs_mask": out["inputs_mask"]}

    tb = GeneralDistiller(tc, dc, teacher, student, adaptor, adaptor)
    for proj, m in zip(tb.projs, layer_map):  # start from the recipe's projections
        proj.load_state_dict(projections[str(m)].state_dict())
    params = list(student.parameters()) + [p for proj in tb.projs if proj is not None for p in proj.parameters()]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    return plain_step(lambda: tb.train_on_batch(inputs, {})[0], params, stage, device, dtype)
