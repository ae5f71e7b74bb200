"""One call per step: every configured distillation term for all mapped layers.

Public: :class:`DistillationLoss`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from kdfast.losses._checks import check_choice, check_positive

TERMS = ("hidden", "attention", "cosine", "feature_map", "logits")
ATTENTION_LOSSES = ("mse", "kl")
ATTENTION_SOURCES = ("auto", "qk", "scores", "attentions")
# accepted spellings of each field (transformers ModelOutput names first, then kdfast.models / dict keys)
_FIELDS = {"hidden_states": ("hidden_states",), "attentions": ("attentions",), "scores": ("scores",),
           "q": ("q", "queries"), "k": ("k", "keys"), "logits": ("logits",)}


def _field(outputs, name: str):
    for key in _FIELDS[name]:
        value = outputs.get(key) if isinstance(outputs, Mapping) else getattr(outputs, key, None)
        if value is not None:
            return value
    return None


def _layer_map(layer_map) -> dict[int, int]:
    from kdfast.models.layer_map import uniform_layer_map

    if isinstance(layer_map, tuple) and len(layer_map) == 2 and all(isinstance(v, int) for v in layer_map):
        return uniform_layer_map(*layer_map)
    if not isinstance(layer_map, Mapping) or not layer_map:
        raise ValueError("layer_map must be a non-empty {student_index: teacher_index} dict or an "
                         f"(n_teacher, n_student) pair of ints, got {layer_map!r}")
    out = {}
    for m, g in layer_map.items():
        if isinstance(m, bool) or isinstance(g, bool) or not isinstance(m, int) or not isinstance(g, int) \
                or m < 0 or g < 0:
            raise ValueError(f"layer_map entries must be non-negative ints, got {m!r}: {g!r}")
        out[m] = g
    return dict(sorted(out.items()))


class DistillationLoss(nn.Module):
    r"""Weighted sum of the distillation terms over all mapped layers, in one call.

    ``layer_map`` maps **hidden-state indices** (as in ``output_hidden_states``: 0 is the
    embedding output, m the output of layer m) of the student to those of the teacher, e.g.
    ``{0: 0, 1: 2, 2: 4}``; an ``(n_teacher, n_student)`` pair builds TinyBERT's uniform map
    (:func:`kdfast.models.uniform_layer_map`). For every pair (m, g):

    - ``hidden``: :func:`kdfast.hidden_mse_loss` (h_s^m W_m^T + b_m, h_t^g), through a projection
      ``projections[str(m)]`` (``nn.Linear(d_s, d_t)``) owned by this module when the widths
      differ (built when ``student_hidden_size`` / ``teacher_hidden_size`` are given);
    - ``cosine``: :func:`kdfast.cosine_loss` (h_s^m, h_t^g) (equal widths);
    - ``feature_map``: :func:`kdfast.feature_map_loss` (h_s^m, h_t^g) (equal widths);
    - ``attention`` (pairs with m >= 1, attention of student layer m - 1 against teacher layer
      g - 1, 0-based): ``attention="mse"`` (TinyBERT) or ``"kl"`` (MiniLM / MobileBERT), from
      the first source both outputs have (``attention_source="auto"``):
        ``qk``: ``q`` / ``k`` (or ``queries`` / ``keys``) [B, H, L, dh] tuples ->
        :func:`kdfast.flash_attention_transfer` (no L x L map; ``qk_prescaled=True``, the default,
        means the queries already carry 1/sqrt(dh), as ``kdfast.models`` capture them);
        ``scores``: pre-softmax maps -> :func:`kdfast.attention_mse_loss` / ``attention_kl_loss``;
        ``attentions``: the probabilities ``transformers`` returns with ``output_attentions``:
        ``mse`` compares the probabilities, ``kl`` uses log-probabilities as scores (KL(A_t || A_s));
    - ``logits`` (once, not per layer): :func:`kdfast.kd_loss` at ``temperature`` (``batchmean``,
      T^2-scaled KL); for [B, L, V] logits the padded tokens are left out.

    Each per-layer term is **summed** over the mapped layers (TinyBERT's convention), then

        total = sum_term weights[term] * term

    ``attention_mask`` [B, L] (nonzero = real token) masks every term. Teacher tensors are
    detached and cast to the student's dtype (e.g. an fp32 or fp16 teacher against a student run
    under bf16 autocast); the functional losses themselves insist on equal dtypes. Terms whose weight is 0 or
    missing are not computed. Cosine and feature-map terms run as a single call over all mapped
    layers stacked (each layer has the same counted tokens, so the sum over layers is the number
    of layers times the stacked mean); hidden MSE (one projection per layer) and attention run one
    call per layer.

    ``forward(student_outputs, teacher_outputs, attention_mask=None)`` takes the outputs as
    ``transformers`` returns them (``output_hidden_states=True`` / ``output_attentions=True``), or
    dicts / ``kdfast.models`` outputs with ``hidden_states``, ``attentions``, ``scores``, ``q`` /
    ``k`` (``queries`` / ``keys``) tuples and ``logits``, and returns ``(total, terms)``: the
    weighted total (differentiable) and ``{term: detached 0-d float tensor}`` of the unweighted
    terms for logging (no host sync; ``float()`` them when logging).

    Raises:
        ValueError naming the argument: bad ``layer_map`` / ``weights`` / ``temperature`` /
        ``attention`` / ``attention_source``; at call time a missing output field, a layer
        index out of range, or hidden widths that differ without a projection.
    """

    def __init__(self, layer_map, weights: Mapping[str, float], temperature: float = 1.0, *,
                 student_hidden_size: int | None = None, teacher_hidden_size: int | None = None,
                 attention: str = "mse", attention_source: str = "auto", qk_prescaled: bool = True,
                 projection_bias: bool = True, backend: str = "auto") -> None:
        super().__init__()
        self.layer_map = _layer_map(layer_map)
        if not isinstance(weights, Mapping):
            raise ValueError(f"weights must be a dict {{term: weight}} over {TERMS}, got {weights!r}")
        self.weights = {}
        for term, wt in weights.items():
            if term not in TERMS:
                raise ValueError(f"weights has an unknown term {term!r}; terms are {TERMS}")
            try:
                wt = float(wt)
            except (TypeError, ValueError):
                raise ValueError(f"weights[{term!r}] must be a number, got {wt!r}") from None
            if not (wt >= 0 and math.isfinite(wt)):
                raise ValueError(f"weights[{term!r}] must be >= 0 and finite, got {wt!r}")
            if wt:
                self.weights[term] = wt
        if not self.weights:
            raise ValueError(f"weights must give at least one term in {TERMS} a weight > 0")
        self.temperature = check_positive("temperature", temperature)
        self.attention = check_choice("attention", attention, ATTENTION_LOSSES)
        self.attention_source = check_choice("attention_source", attention_source, ATTENTION_SOURCES)
        self.qk_prescaled = bool(qk_prescaled)
        self.backend = backend
        self.projections = nn.ModuleDict()
        if "hidden" in self.weights and student_hidden_size is not None and teacher_hidden_size is not None:
            for name, v in (("student_hidden_size", student_hidden_size), ("teacher_hidden_size", teacher_hidden_size)):
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise ValueError(f"{name} must be a positive int, got {v!r}")
            if student_hidden_size != teacher_hidden_size:
                for m in self.layer_map:
                    self.projections[str(m)] = nn.Linear(student_hidden_size, teacher_hidden_size,
                                                         bias=projection_bias)

    # --- helpers -----------------------------------------------------------------------------

    @staticmethod
    def _tuple(outputs, name: str, who: str) -> tuple:
        value = _field(outputs, name)
        if value is None:
            raise ValueError(f"{who} has no {name!r} (run the model with output_hidden_states=True / "
                             f"output_attentions=True, or capture it)")
        return tuple(value)

    @staticmethod
    def _pick(seq: tuple, index: int, who: str, name: str) -> Tensor:
        if not 0 <= index < len(seq):
            raise ValueError(f"layer_map refers to {name}[{index}] of {who}, which has {len(seq)} entries")
        return seq[index]

    def _pairs(self, s_seq: tuple, t_seq: tuple, name: str, offset: int = 0) -> list[tuple[int, Tensor, Tensor]]:
        """(m, student tensor, teacher tensor detached and in the student's dtype) per mapped pair."""
        out = []
        for m, g in self.layer_map.items():
            if m - offset < 0 or g - offset < 0:
                continue
            s = self._pick(s_seq, m - offset, "student_outputs", name)
            t = self._pick(t_seq, g - offset, "teacher_outputs", name)
            if isinstance(s, Tensor) and isinstance(t, Tensor):
                t = t.detach().to(s.dtype)
            out.append((m, s, t))
        return out

    def _attention_source(self, student_outputs, teacher_outputs) -> str:
        order = ("qk", "scores", "attentions") if self.attention_source == "auto" else (self.attention_source,)
        for src in order:
            names = ("q", "k") if src == "qk" else (src,)
            if all(_field(o, n) is not None for o in (student_outputs, teacher_outputs) for n in names):
                return src
        raise ValueError(f"student_outputs / teacher_outputs lack the attention inputs for "
                         f"attention_source={self.attention_source!r} (need q and k, scores or attentions)")

    # --- forward -----------------------------------------------------------------------------

    def forward(self, student_outputs, teacher_outputs,
                attention_mask: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        from kdfast.losses.attention import attention_kl_loss, attention_mse_loss, flash_attention_transfer
        from kdfast.losses.hidden import cosine_loss, feature_map_loss, hidden_mse_loss
        from kdfast.losses.kd import kd_loss

        terms: dict[str, Tensor] = {}
        mask = attention_mask
        if {"hidden", "cosine", "feature_map"} & self.weights.keys():
            pairs = self._pairs(self._tuple(student_outputs, "hidden_states", "student_outputs"),
                                self._tuple(teacher_outputs, "hidden_states", "teacher_outputs"), "hidden_states")
            if "hidden" in self.weights:
                total = None
                for m, hs, ht in pairs:
                    proj = self.projections[str(m)] if str(m) in self.projections else None
                    if proj is None and hs.shape[-1] != ht.shape[-1]:
                        raise ValueError(f"student_hidden_size / teacher_hidden_size must be given: hidden widths "
                                         f"differ ({hs.shape[-1]} vs {ht.shape[-1]}) and there is no projection")
                    value = hidden_mse_loss(hs, ht, proj.weight if proj is not None else None,
                                            proj.bias if proj is not None else None, mask, backend=self.backend)
                    total = value if total is None else total + value
                terms["hidden"] = total
            for term, fn in (("cosine", cosine_loss), ("feature_map", feature_map_loss)):
                if term in self.weights:
                    kw = {"backend": self.backend} if term == "cosine" else {}
                    hs = torch.stack([p[1] for p in pairs])
                    ht = torch.stack([p[2].detach() for p in pairs])
                    stacked_mask = mask.expand(len(pairs), *mask.shape) if mask is not None else None
                    terms[term] = len(pairs) * fn(hs, ht, stacked_mask, **kw)
        if "attention" in self.weights:
            src = self._attention_source(student_outputs, teacher_outputs)
            total = None
            if src == "qk":
                qs = self._pairs(self._tuple(student_outputs, "q", "student_outputs"),
                                 self._tuple(teacher_outputs, "q", "teacher_outputs"), "q", offset=1)
                ks = self._pairs(self._tuple(student_outputs, "k", "student_outputs"),
                                 self._tuple(teacher_outputs, "k", "teacher_outputs"), "k", offset=1)
                scale = 1.0 if self.qk_prescaled else None
                for (_, q_s, q_t), (_, k_s, k_t) in zip(qs, ks):
                    value = flash_attention_transfer(q_s, k_s, q_t, k_t, mask, loss=self.attention, scale_s=scale,
                                                     scale_t=scale, backend=self.backend)
                    total = value if total is None else total + value
            else:
                maps = self._pairs(self._tuple(student_outputs, src, "student_outputs"),
                                   self._tuple(teacher_outputs, src, "teacher_outputs"), src, offset=1)
                for _, a_s, a_t in maps:
                    if self.attention == "mse":
                        value = attention_mse_loss(a_s, a_t, mask, backend=self.backend)
                    else:
                        if src == "attentions":  # probabilities -> log-probabilities as scores
                            fill = torch.finfo(a_s.dtype).min
                            a_s = torch.where(a_s > 0, a_s.clamp_min(torch.finfo(a_s.dtype).tiny).log(), fill)
                            a_t = torch.where(a_t > 0, a_t.clamp_min(torch.finfo(a_t.dtype).tiny).log(), fill)
                        value = attention_kl_loss(a_s, a_t, mask, backend=self.backend)
                    total = value if total is None else total + value
            if total is None:
                raise ValueError("layer_map has no pair with a student index >= 1: no attention layer to transfer")
            terms["attention"] = total
        if "logits" in self.weights:
            s_logits = _field(student_outputs, "logits")
            t_logits = _field(teacher_outputs, "logits")
            if s_logits is None or t_logits is None:
                raise ValueError("student_outputs / teacher_outputs have no 'logits' for the logits term")
            row_mask = mask if mask is not None and tuple(mask.shape) == tuple(s_logits.shape[:-1]) else None
            terms["logits"] = kd_loss(s_logits, t_logits.detach().to(s_logits.dtype), temperature=self.temperature, mask=row_mask,
                                      backend=self.backend)
        total = None
        for term, value in terms.items():
            weighted = self.weights[term] * value
            total = weighted if total is None else total + weighted
        return total, {term: value.detach() for term, value in terms.items()}

    def extra_repr(self) -> str:
        return (f"layer_map={self.layer_map}, weights={self.weights}, temperature={self.temperature}, "
                f"attention={self.attention!r}, attention_source={self.attention_source!r}")
