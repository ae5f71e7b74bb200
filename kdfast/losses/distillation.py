"""One call per step: every configured distillation term for all mapped layers.

Public: :class:`DistillationLoss`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from kdfast.losses._checks import check_choice, check_nonnegative, check_temperature, value_checks_enabled

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
    from kdfast.losses.layer_map import uniform_layer_map

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


def _layer_windows(name: str, windows) -> tuple[dict[int, int | None], bool]:
    """Per-layer windows (a sequence over the model's attention layers, 0-based, or a {layer: window}
    dict) -> ({layer: window}, whether every layer must be listed: true for a sequence), each None
    (global) or an int >= 0; None: every layer global."""
    from kdfast.losses.attention import check_window

    if windows is None:
        return {}, False
    if isinstance(windows, Mapping):
        items = list(windows.items())
    elif isinstance(windows, (list, tuple)):
        items = list(enumerate(windows))
    else:
        raise ValueError(f"{name} must be a sequence (one window per attention layer) or a {{layer: window}} dict, "
                         f"got {type(windows).__name__}")
    out = {}
    for layer, w in items:
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise ValueError(f"{name} keys must be attention-layer indices (ints >= 0), got {layer!r}")
        check_window(f"{name}[{layer}]", w)
        out[layer] = w
    return out, not isinstance(windows, Mapping)


def _stack(tensors: list[Tensor]) -> Tensor:
    """Layers stacked along a new leading dimension (a view for a single layer)."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def _cat(tensors: tuple[Tensor, ...]) -> Tensor:
    """Layers concatenated along the batch dimension (the tensor itself for a single layer)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _repeat_mask(mask: Tensor | None, n: int, *, stack: bool = False) -> Tensor | None:
    """The token mask of n stacked ([n, B, L], a view) or batch-concatenated ([n B, L]) layers."""
    if mask is None:
        return None
    return mask.expand(n, *mask.shape) if stack else mask.repeat(n, *([1] * (mask.dim() - 1)))


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
      Local (sliding-window) layers: ``teacher_windows`` / ``student_windows`` give each attention
      layer's window (0-based layer index l, the layer whose output is hidden state l + 1; a
      sequence with one entry per layer, or a ``{layer: window}`` dict; each None for a global
      layer or an int w >= 0 for the band |i - j| <= w, e.g. 64 for ModernBERT's
      ``local_attention=128``; None for the whole argument: every layer global). A mapped pair
      compares its two layers on their common band, passed to the attention loss as ``window``.
      When the two layers' windows differ (a local teacher layer against a global student layer,
      or two different bands), the two distributions are not comparable and construction raises a
      one-line ValueError naming the pair, unless ``windows`` gives that pair's window explicitly
      (``{student hidden index m: None or w}``): both sides are then compared on that band
      (for example ``windows={2: 64}`` distils a global student layer on the teacher's band only).
      Students built by :mod:`kdfast.models` from a teacher keep each copied layer's window, so
      their pairs agree;
    - ``logits`` (once, not per layer): :func:`kdfast.kd_loss` at ``temperature`` (``batchmean``,
      T^2-scaled KL); the padded tokens are left out, for [B, L, V] logits and for flattened
      [B * L, V] ones (row-major token order); any other mask shape raises ValueError.

    Each per-layer term is **summed** over the mapped layers (TinyBERT's convention), then

        total = sum_term weights[term] * term

    ``attention_mask`` [B, L] (nonzero = real token) masks every term. Teacher tensors are
    detached and cast to the student's dtype (e.g. an fp32 or fp16 teacher against a student run
    under bf16 autocast); the functional losses themselves insist on equal dtypes. Terms whose weight is 0 or
    missing are not computed. Cosine and feature-map terms run as a single call over all mapped
    layers stacked (each layer has the same counted tokens, so the sum over layers is the number
    of layers times the stacked mean). Hidden MSE and attention run one call per layer by
    default; ``stack_layers=True`` makes them one call each when the layers' shapes agree:
    projected hidden MSE through :func:`kdfast.hidden_mse_loss` with the projection weights
    stacked [n_layers, d_t, d_s] (one batched GEMM per chunk), attention on the layers
    concatenated along the batch with the mask repeated (every layer has the same normaliser, so
    the sum is n_layers times the concatenated loss). That launches fewer kernels but copies
    every layer's inputs; on the 2-core CPU it measured slower (README, "Use"; the numbers in
    benchmarks/results/cpu-2core-x86_64-distillation-one-call.txt),
    hence off by default. The TinyBERT MSE on score maps (``attention="mse"``,
    ``attention_source="scores"``) always runs per layer: its count of elements above the -1e2
    threshold may differ between layers. Teacher and student head counts may differ when one
    divides the other (:func:`kdfast.losses.map_teacher_heads`).

    ``forward(student_outputs, teacher_outputs, attention_mask=None)`` takes the outputs as
    ``transformers`` returns them (``output_hidden_states=True`` / ``output_attentions=True``), or
    dicts / ``kdfast.models`` outputs with ``hidden_states``, ``attentions``, ``scores``, ``q`` /
    ``k`` (``queries`` / ``keys``) tuples and ``logits``, and returns ``(total, terms)``: the
    weighted total (differentiable) and ``{term: detached 0-d float tensor}`` of the unweighted
    terms for logging (no host sync; ``float()`` them when logging).

    Raises:
        ValueError naming the argument: bad ``layer_map`` / ``weights`` / ``temperature`` /
        ``attention`` / ``attention_source`` / windows (not None or an int >= 0; a mapped layer
        missing from a windows sequence; a pair whose windows differ); at call time a missing output field, a layer
        index out of range, or hidden widths that differ without a projection.
    """

    def __init__(self, layer_map, weights: Mapping[str, float], temperature: float = 1.0, *,
                 student_hidden_size: int | None = None, teacher_hidden_size: int | None = None,
                 attention: str = "mse", attention_source: str = "auto", qk_prescaled: bool = True,
                 projection_bias: bool = True, stack_layers: bool = False,
                 teacher_windows=None, student_windows=None, windows: Mapping[int, int | None] | None = None,
                 backend: str = "auto") -> None:
        super().__init__()
        self.layer_map = _layer_map(layer_map)
        self.pair_windows = self._pair_windows(teacher_windows, student_windows, windows)
        if not isinstance(weights, Mapping):
            raise ValueError(f"weights must be a dict {{term: weight}} over {TERMS}, got {weights!r}")
        self.weights = {}
        for term, wt in weights.items():
            if term not in TERMS:
                raise ValueError(f"weights has an unknown term {term!r}; terms are {TERMS}")
            wt = check_nonnegative(f"weights[{term!r}]", wt)
            if wt:
                self.weights[term] = wt
        if not self.weights:
            raise ValueError(f"weights must give at least one term in {TERMS} a weight > 0")
        self.temperature = check_temperature(temperature)
        self.attention = check_choice("attention", attention, ATTENTION_LOSSES)
        self.attention_source = check_choice("attention_source", attention_source, ATTENTION_SOURCES)
        self.qk_prescaled = bool(qk_prescaled)
        self.stack_layers = bool(stack_layers)
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

    def _pair_windows(self, teacher_windows, student_windows, windows) -> dict[int, int | None]:
        """{student hidden index m: window} of every attention pair (m >= 1) of the layer map."""
        from kdfast.losses.attention import check_window

        tw = _layer_windows("teacher_windows", teacher_windows)
        sw = _layer_windows("student_windows", student_windows)
        explicit = {}
        if windows is not None:
            if not isinstance(windows, Mapping):
                raise ValueError(f"windows must be a {{student hidden index: window}} dict, got {windows!r}")
            for m, w in windows.items():
                if isinstance(m, bool) or not isinstance(m, int) or m not in self.layer_map or m < 1:
                    raise ValueError(f"windows has key {m!r}, which is not a student index >= 1 of layer_map "
                                     f"{sorted(self.layer_map)}")
                check_window(f"windows[{m}]", w)
                explicit[m] = w

        def layer_window(table: tuple[dict, bool], name: str, layer: int):
            windows_of, every_layer = table
            if every_layer and layer not in windows_of:
                raise ValueError(f"{name} has {len(windows_of)} entries but layer_map uses attention layer {layer}")
            return windows_of.get(layer)  # a dict lists only the local layers

        out = {}
        for m, g in self.layer_map.items():
            if m < 1 or g < 1:
                continue
            if m in explicit:
                out[m] = explicit[m]
                continue
            w_s = layer_window(sw, "student_windows", m - 1)
            w_t = layer_window(tw, "teacher_windows", g - 1)
            if w_s != w_t:
                raise ValueError(f"layer_map pair {m}: {g} compares student attention layer {m - 1} (window {w_s}) "
                                 f"with teacher attention layer {g - 1} (window {w_t}); give the pair's band in "
                                 f"windows={{{m}: ...}} to compare both on it")
            out[m] = w_t
        return out

    @staticmethod
    def _tuple(outputs, name: str, who: str) -> tuple:
        value = _field(outputs, name)
        if value is None:
            raise ValueError(f"{who} has no {name!r} (run the model with output_hidden_states=True / "
                             f"output_attentions=True, or capture it)")
        return tuple(value)

    @staticmethod
    def _pick(seq: tuple, index: int, who: str, name: str) -> Tensor:
        if name == "attentions" and (not seq or (0 <= index < len(seq) and seq[index] is None)):
            raise ValueError(f"{who} has no attention maps ({name}[{index}] is missing): a model on SDPA or flash "
                             f"attention returns none even with output_attentions=True. Load it with "
                             f'attn_implementation="eager", or capture Q / K (kdfast.models capture=("qk",)) for '
                             f"flash_attention_transfer")
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

    def _hidden_mse(self, pairs: list[tuple[int, Tensor, Tensor]], mask: Tensor | None) -> Tensor:
        """Sum over the mapped layers of the projected hidden MSE: one call per layer, or with
        ``stack_layers`` one fused call when the layers have equal shapes (one batched GEMM per
        chunk for all projections)."""
        from kdfast.losses.hidden import hidden_mse_loss

        projs = [self.projections[str(m)] if str(m) in self.projections else None for m, _, _ in pairs]
        for (_, hs, ht), proj in zip(pairs, projs):
            if proj is None and hs.shape[-1] != ht.shape[-1]:
                raise ValueError(f"student_hidden_size / teacher_hidden_size must be given: hidden widths "
                                 f"differ ({hs.shape[-1]} vs {ht.shape[-1]}) and there is no projection")
        shapes = {(tuple(hs.shape), tuple(ht.shape), hs.dtype) for _, hs, ht in pairs}
        uniform = self.stack_layers and len(shapes) == 1
        if uniform and all(p is None for p in projs):
            # no projection: every layer counts the same tokens, so the sum is n x the stacked mean
            n = len(pairs)
            return n * hidden_mse_loss(_stack([p[1] for p in pairs]), _stack([p[2] for p in pairs]),
                                       mask=_repeat_mask(mask, n, stack=True), backend=self.backend)
        if uniform and all(p is not None for p in projs) and len({p.weight.dtype for p in projs}) == 1 \
                and len({p.bias is None for p in projs}) == 1:
            weight = _stack([p.weight for p in projs])  # differentiable: each Linear gets its slice
            bias = _stack([p.bias for p in projs]) if projs[0].bias is not None else None
            return hidden_mse_loss(_stack([p[1] for p in pairs]), _stack([p[2] for p in pairs]), weight, bias, mask,
                                   backend=self.backend)
        total = None
        for (_, hs, ht), proj in zip(pairs, projs):
            value = hidden_mse_loss(hs, ht, proj.weight if proj is not None else None,
                                    proj.bias if proj is not None else None, mask, backend=self.backend)
            total = value if total is None else total + value
        return total

    def _attention(self, student_outputs, teacher_outputs, mask: Tensor | None) -> Tensor:
        """Sum over the mapped layers of the attention term: one call per layer, or with
        ``stack_layers`` layers of equal shapes concatenated along the batch (the mask repeated)
        in one call. Every layer has the same normaliser (H times its real query rows for KL, H sum_b
        n_b^2 for the flash MSE), so the sum over layers is n x the concatenated loss. The TinyBERT
        MSE on score maps is the exception: it counts the elements above its threshold, which may
        differ between layers, so it runs per layer."""
        from kdfast.losses.attention import (
            attention_kl_loss,
            attention_mse_loss,
            flash_attention_transfer,
            map_teacher_heads,
        )

        src = self._attention_source(student_outputs, teacher_outputs)
        if src == "qk":
            qs = self._pairs(self._tuple(student_outputs, "q", "student_outputs"),
                             self._tuple(teacher_outputs, "q", "teacher_outputs"), "q", offset=1)
            ks = self._pairs(self._tuple(student_outputs, "k", "student_outputs"),
                             self._tuple(teacher_outputs, "k", "teacher_outputs"), "k", offset=1)
            scale = 1.0 if self.qk_prescaled else None
            windows = [self.pair_windows[m] for m, _, _ in qs]
            layers = [(q_s, k_s, q_t, k_t) for (_, q_s, q_t), (_, k_s, k_t) in zip(qs, ks)]

            def term(q_s, k_s, q_t, k_t, m, window):
                return flash_attention_transfer(q_s, k_s, q_t, k_t, m, loss=self.attention, scale_s=scale,
                                                scale_t=scale, window=window, backend=self.backend)
        else:
            pairs = self._pairs(self._tuple(student_outputs, src, "student_outputs"),
                                self._tuple(teacher_outputs, src, "teacher_outputs"), src, offset=1)
            windows = [self.pair_windows[m] for m, _, _ in pairs]
            layers = [(a_s, a_t) for _, a_s, a_t in pairs]

            def term(a_s, a_t, m, window):
                if self.attention == "mse":
                    return attention_mse_loss(a_s, a_t, m, window=window, backend=self.backend)
                if src == "attentions":  # probabilities -> log-probabilities as scores
                    # the teacher's target is > 0 where every probability of its head group is
                    # (map_teacher_heads averages log-probabilities): map that indicator to the student's heads
                    if value_checks_enabled(a_s) and bool(((a_s == 0) & (map_teacher_heads(
                            (a_t > 0).to(a_s.dtype), a_s.shape[1])[0] == 1)).any()):
                        raise ValueError("student_outputs attentions hold a probability of exactly 0 where the "
                                         "teacher's is > 0, so the attention KL is infinite: transformers returns "
                                         "the maps after attention dropout; train the student with "
                                         "attention_probs_dropout_prob=0, or capture Q / K (attention_source='qk')")
                    fill = torch.finfo(a_s.dtype).min
                    a_s = torch.where(a_s > 0, a_s.clamp_min(torch.finfo(a_s.dtype).tiny).log(), fill)
                    a_t = torch.where(a_t > 0, a_t.clamp_min(torch.finfo(a_t.dtype).tiny).log(), fill)
                return attention_kl_loss(a_s, a_t, m, window=window, backend=self.backend)
        if not layers:
            raise ValueError("layer_map has no pair with a student index >= 1: no attention layer to transfer")
        per_layer_counts = src == "scores" and self.attention == "mse"
        uniform = len({tuple((tuple(x.shape), x.dtype) for x in layer) for layer in layers}) == 1 \
            and len(set(windows)) == 1
        if self.stack_layers and len(layers) > 1 and uniform and not per_layer_counts:
            n = len(layers)
            return n * term(*(_cat(xs) for xs in zip(*layers)), _repeat_mask(mask, n), windows[0])
        total = None
        for layer, window in zip(layers, windows):
            value = term(*layer, mask, window)
            total = value if total is None else total + value
        return total

    @staticmethod
    def _logit_mask(mask: Tensor | None, logits: Tensor) -> Tensor | None:
        """The token mask as kd_loss's row mask: [B, L] for [B, L, V] logits, or flattened for
        [B * L, V] logits (rows in row-major token order, as ``logits.view(-1, V)`` gives them).
        Any other pairing is refused: the mask could not say which rows are padding."""
        if mask is None:
            return None
        if not isinstance(mask, Tensor):
            raise ValueError(f"attention_mask must be a torch.Tensor, got {type(mask).__name__}")
        lead = tuple(logits.shape[:-1])
        if tuple(mask.shape) == lead:
            return mask
        if logits.dim() == 2 and mask.dim() >= 2 and mask.numel() == logits.shape[0]:
            return mask.reshape(-1)
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, which does not match the logits "
                         f"{tuple(logits.shape)}: expected {lead}, or [B, L] with B * L = {lead[0] if lead else 0} "
                         f"for flattened [B * L, V] logits")

    # --- forward -----------------------------------------------------------------------------

    def forward(self, student_outputs, teacher_outputs,
                attention_mask: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        from kdfast.losses.hidden import cosine_loss, feature_map_loss
        from kdfast.losses.kd import kd_loss

        terms: dict[str, Tensor] = {}
        mask = attention_mask
        if {"hidden", "cosine", "feature_map"} & self.weights.keys():
            pairs = self._pairs(self._tuple(student_outputs, "hidden_states", "student_outputs"),
                                self._tuple(teacher_outputs, "hidden_states", "teacher_outputs"), "hidden_states")
            if "hidden" in self.weights:
                terms["hidden"] = self._hidden_mse(pairs, mask)
            for term, fn in (("cosine", cosine_loss), ("feature_map", feature_map_loss)):
                if term in self.weights:
                    kw = {"backend": self.backend} if term == "cosine" else {}
                    hs = _stack([p[1] for p in pairs])
                    ht = _stack([p[2] for p in pairs])
                    terms[term] = len(pairs) * fn(hs, ht, _repeat_mask(mask, len(pairs), stack=True), **kw)
        if "attention" in self.weights:
            terms["attention"] = self._attention(student_outputs, teacher_outputs, mask)
        if "logits" in self.weights:
            s_logits = _field(student_outputs, "logits")
            t_logits = _field(teacher_outputs, "logits")
            if s_logits is None or t_logits is None:
                raise ValueError("student_outputs / teacher_outputs have no 'logits' for the logits term")
            row_mask = self._logit_mask(mask, s_logits)
            terms["logits"] = kd_loss(s_logits, t_logits.detach().to(s_logits.dtype), temperature=self.temperature, mask=row_mask,
                                      backend=self.backend)
        total = None
        for term, value in terms.items():
            weighted = self.weights[term] * value
            total = weighted if total is None else total + weighted
        return total, {term: value.detach() for term, value in terms.items()}

    def extra_repr(self) -> str:
        return (f"layer_map={self.layer_map}, weights={self.weights}, temperature={self.temperature}, "
                f"attention={self.attention!r}, attention_source={self.attention_source!r}"
                + (f", windows={self.pair_windows}" if any(w is not None for w in self.pair_windows.values()) else ""))
