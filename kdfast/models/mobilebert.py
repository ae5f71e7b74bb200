"""MobileBERT (and its IB-BERT teacher) in plain PyTorch, state-dict compatible with transformers.

``KDMobileBert`` / ``KDMobileBertForMaskedLM`` take a ``transformers.MobileBertConfig`` and build modules
whose ``state_dict()`` keys, order and shapes equal ``transformers.MobileBertModel`` /
``MobileBertForMaskedLM`` built from the same config, so weights load both ways with
``load_state_dict`` (see ``from_transformers`` / ``to_transformers``), and whose outputs match
transformers within fp32 rounding.

Why a separate implementation:

* **Capture without the slow path.** ``forward(..., capture=("hidden", "qk"))`` returns per-layer hidden
  states and per-layer queries/keys ``[B, H, L, dh]`` while attention itself still runs through
  ``torch.nn.functional.scaled_dot_product_attention``. Only ``"scores"`` / ``"attentions"`` (which are
  ``L x L`` per head by definition) switch a layer to the explicit ``softmax(q k^T)`` path.
  Captured tensors stay in the autograd graph, so losses on them train the model.
* **Fusable memory-bound steps.** The attention inputs, "bias + residual + NoNorm" and the stacked FFN
  chain are small functions here (transformers' arithmetic); :func:`set_kernel_backend` (or
  :func:`kdfast.models.enable_fused_kernels`) runs them on the fused kernels of :mod:`kdfast.models.fused`
  instead, on one backend of :mod:`kdfast.ops.mobilebert_blocks` chosen by the op registry.

Precision: run in **bf16 on GPU** (autocast or ``model.to(torch.bfloat16)``). fp16 is known to overflow
in MobileBERT: NoNorm (``x * gamma + beta``) does not renormalise, so activations in the 24-layer
residual stream grow beyond fp16's range (65504). fp32 is the reference on CPU.

Two places where we follow transformers' code rather than the obvious reading (kept for exact parity):
the embedding ``LayerNorm`` and the last FFN's ``output.LayerNorm`` are built without ``eps`` in
transformers, so with ``normalization_type="layer_norm"`` they use PyTorch's default ``eps=1e-5``, while
all other norms use ``config.layer_norm_eps``. NoNorm ignores eps.

IB-BERT (``mobilebert_config("ib-bert")``, the paper's teacher: 512 between blocks, 1024 inside, Q/K/V
computed from the 512-wide inter-block features, ``key_query_shared_bottleneck=False``): transformers'
``MobileBertSelfAttention`` always builds ``query``/``key`` with ``in_features=true_hidden_size``, so for
this configuration it builds ``query``/``key`` as 1024x1024 and its forward fails with a shape error. We
build them with the width they actually receive (512), as the original TensorFlow code does; this gives
the paper's 293M parameters. For every configuration transformers can run, the in-features coincide and
state dicts are identical.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CAPTURE_KINDS",
    "FFNParams",
    "additive_mask",
    "attention_inputs",
    "KDMobileBert",
    "KDMobileBertForMaskedLM",
    "KDMobileBertOutput",
    "NoNorm",
    "bias_residual_layernorm",
    "bias_residual_nonorm",
    "kernel_backend",
    "mobilebert_config",
    "set_kernel_backend",
    "stacked_ffn",
]

CAPTURE_KINDS = frozenset({"hidden", "scores", "attentions", "qk"})


# --------------------------------------------------------------------------------------------------
# The fusable elementwise / chain steps
# --------------------------------------------------------------------------------------------------

# None: the eager functions below (transformers' arithmetic, bit for bit); a backend name: the fused
# functions of kdfast.models.fused on that backend ("auto" resolved per call by kdfast.ops.registry).
_kernel_backend: str | None = None
# the fused functions (attention_inputs, stacked_ffn, bias_residual_nonorm), installed by
# kdfast.models.fused when it is imported (kdfast.models imports it): this module does not import it
_fused: tuple[Callable, Callable, Callable] | None = None


def install_fused_functions(attention_inputs: Callable, stacked_ffn: Callable, bias_residual_nonorm: Callable) -> None:
    """Called by :mod:`kdfast.models.fused`: the functions a block runs once :func:`set_kernel_backend`
    names a backend (each takes this module's arguments plus ``backend=``)."""
    global _fused
    _fused = (attention_inputs, stacked_ffn, bias_residual_nonorm)


def _fused_functions() -> tuple[Callable, Callable, Callable]:
    if _fused is None:
        raise RuntimeError("the fused MobileBERT kernels are not installed: import kdfast.models (which imports "
                           "kdfast.models.fused) before setting a kernel backend")
    return _fused


def set_kernel_backend(backend: str | None) -> str | None:
    """Run the blocks' attention inputs, bias + residual + NoNorm epilogues and stacked FFNs on the fused
    kernels of ``backend`` (``"auto" | "triton" | "cpu" | "torch"``; ``"cuda"`` has none and raises when
    a block runs), or on this module's eager functions (``None``, the default). Returns the previous
    setting, so that callers can restore it. Raises ValueError naming ``backend`` for an unknown name."""
    global _kernel_backend
    if backend is not None:
        from kdfast.backend import BACKENDS

        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    previous, _kernel_backend = _kernel_backend, backend
    return previous


def kernel_backend() -> str | None:
    """The backend set by :func:`set_kernel_backend` (``None``: eager)."""
    return _kernel_backend


def bias_residual_nonorm(x, bias, residual, gamma, beta):
    """``NoNorm(x + bias + residual) = (x + bias + residual) * gamma + beta``.

    ``x`` is the output of a bias-free GEMM; ``bias`` may be ``None`` when already added. This is the
    memory-bound epilogue the MobileBERT paper's operational optimisations leave behind; a fused kernel
    reads ``x`` and ``residual`` once and writes once.
    """
    y = x if bias is None else x + bias
    return (y + residual) * gamma + beta


def bias_residual_layernorm(x, bias, residual, weight, beta, eps):
    """``LayerNorm(x + bias + residual)`` (the IB-BERT / "w/o OPT" variant of the same epilogue)."""
    y = x if bias is None else x + bias
    return F.layer_norm(y + residual, (y.shape[-1],), weight, beta, eps)


class FFNParams(NamedTuple):
    """Tensors of one FFN of a MobileBERT block: ``norm(W_out act(W_in x + b_in) + b_out + x)``."""

    w_in: torch.Tensor
    b_in: torch.Tensor
    w_out: torch.Tensor
    b_out: torch.Tensor
    gamma: torch.Tensor
    beta: torch.Tensor
    eps: float


def stacked_ffn(x, ffns: Sequence[FFNParams], activation: Callable, normalization_type: str,
                dropout_last: float = 0.0, training: bool = False):
    """Run the chain of residual FFNs of one block: for each ``p`` in ``ffns``
    ``x = norm(act(x @ p.w_in^T + p.b_in) @ p.w_out^T + p.b_out + x)``.

    ``dropout_last`` is applied to the last FFN's output before the residual (transformers does this only
    when ``use_bottleneck=False``). The whole chain at width ``intra_bottleneck_size`` (128) is small enough
    to keep on chip; :func:`kdfast.models.fused.fused_stacked_ffn` runs it as one fused node (see
    :func:`set_kernel_backend`). The NoNorm epilogues here follow :func:`set_kernel_backend` too.
    """
    n = len(ffns)
    for i, p in enumerate(ffns):
        h = activation(F.linear(x, p.w_in, p.b_in))
        y = F.linear(h, p.w_out)
        bias = p.b_out
        if i == n - 1 and dropout_last > 0.0 and training:
            y = F.dropout(y + bias, dropout_last, True)
            bias = None
        if normalization_type == "no_norm":
            x = _nonorm_epilogue(y, bias, x, p.gamma, p.beta)
        else:
            x = bias_residual_layernorm(y, bias, x, p.gamma, p.beta, p.eps)
    return x


def attention_inputs(layer, hidden):
    """The block's attention inputs from its input ``hidden`` ``[B, L, hidden_size]``:
    ``(layer_input, q, k, v)``, with ``layer_input`` the residual of the attention output (the input
    bottleneck ``NoNorm(hidden W_bi^T + b_bi)`` when ``use_bottleneck``, else ``hidden``) and ``q, k, v``
    ``[B, L, H*dh]`` the query/key/value projections (``q = q_in W_q^T + b_q`` etc., with ``q_in = k_in``
    the attention bottleneck ``NoNorm(hidden W_ba^T + b_ba)`` under ``key_query_shared_bottleneck``).

    Every GEMM here reads ``hidden`` (or one bottleneck of it); :func:`kdfast.models.fused.fused_attention_inputs`
    groups them into fewer, larger GEMMs (see :func:`set_kernel_backend`).
    """
    if layer.use_bottleneck:
        layer_input = layer.bottleneck.input(hidden)
        if layer.use_bottleneck_attention:
            q_in = k_in = v_in = layer_input
        elif layer.key_query_shared_bottleneck:
            q_in = k_in = layer.bottleneck.attention(hidden)
            v_in = hidden
        else:
            q_in = k_in = v_in = hidden
    else:
        q_in = k_in = v_in = layer_input = hidden
    sa = layer.attention.self
    return layer_input, sa.query(q_in), sa.key(k_in), sa.value(v_in)


def _nonorm_epilogue(x, bias, residual, gamma, beta):
    """:func:`bias_residual_nonorm`, fused on the backend set by :func:`set_kernel_backend`."""
    if _kernel_backend is None:
        return bias_residual_nonorm(x, bias, residual, gamma, beta)
    return _fused_functions()[2](x, bias, residual, gamma, beta, backend=_kernel_backend)


def _block_steps() -> tuple[Callable, Callable]:
    """``(attention_inputs, stacked_ffn)``: this module's eager functions, or the fused ones on the backend
    set by :func:`set_kernel_backend`."""
    if _kernel_backend is None:
        return attention_inputs, stacked_ffn
    fused_attention_inputs, fused_stacked_ffn, _ = _fused_functions()
    backend = _kernel_backend
    return (lambda layer, hidden: fused_attention_inputs(layer, hidden, backend=backend),
            lambda *args, **kwargs: fused_stacked_ffn(*args, **kwargs, backend=backend))


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------


def mobilebert_config(name: str = "mobilebert", **overrides):
    """A ``transformers.MobileBertConfig`` for ``"mobilebert"``, ``"mobilebert-tiny"`` or ``"ib-bert"``.

    * ``mobilebert``: transformers' defaults (= google/mobilebert-uncased): 24 layers, 512 between blocks,
      128 inside, 4 heads, 4 stacked FFNs of 512, NoNorm, ReLU, trigram embedding of width 128, shared
      key/query bottleneck.
    * ``mobilebert-tiny``: the paper's MobileBERT_TINY (Google's ``..._F-2_tiny_OPT`` config): Q, K and V
      all from the 128-wide bottleneck, 2 stacked FFNs, no pooler activation.
    * ``ib-bert``: the IB-BERT_LARGE teacher: 512 between blocks, 1024 inside, 4 heads, one FFN of 4096,
      GELU, LayerNorm, Q/K/V from the inter-block features (see the module docstring on transformers).

    ``overrides`` are passed to the config (e.g. ``num_hidden_layers=2, vocab_size=100`` for tests).
    """
    from transformers import MobileBertConfig

    presets = {
        "mobilebert": {},
        "mobilebert-tiny": dict(
            intermediate_size=512, intra_bottleneck_size=128, num_feedforward_networks=2,
            use_bottleneck_attention=True, key_query_shared_bottleneck=False, classifier_activation=False,
        ),
        "ib-bert": dict(
            hidden_size=512, intra_bottleneck_size=1024, num_attention_heads=4, intermediate_size=4096,
            num_feedforward_networks=1, hidden_act="gelu", normalization_type="layer_norm",
            use_bottleneck_attention=False, key_query_shared_bottleneck=False, hidden_dropout_prob=0.1,
        ),
    }
    if name not in presets:
        raise ValueError(f"name must be one of {sorted(presets)}, got {name!r}")
    return MobileBertConfig(**{**presets[name], **overrides})


def _true_hidden(config) -> int:
    return config.intra_bottleneck_size if config.use_bottleneck else config.hidden_size


def _activation(name_or_fn) -> Callable:
    if callable(name_or_fn):
        return name_or_fn
    from transformers.activations import ACT2FN

    return ACT2FN[name_or_fn]


# --------------------------------------------------------------------------------------------------
# Modules (attribute names and registration order mirror transformers for identical state dicts)
# --------------------------------------------------------------------------------------------------


class NoNorm(nn.Module):
    """MobileBERT's replacement for LayerNorm: ``x * weight + bias`` (elementwise, no statistics)."""

    def __init__(self, size: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(size))  # registered first, like transformers
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x):
        return x * self.weight + self.bias


def _norm(kind: str, size: int, eps: float | None) -> nn.Module:
    if kind == "no_norm":
        return NoNorm(size)
    if kind == "layer_norm":
        return nn.LayerNorm(size) if eps is None else nn.LayerNorm(size, eps=eps)
    raise ValueError(f"normalization_type must be 'no_norm' or 'layer_norm', got {kind!r}")


def residual_norm(y, bias, residual, norm: nn.Module):
    """``norm(y + bias + residual)``; NoNorm on the kernel backend of :func:`set_kernel_backend`."""
    if isinstance(norm, NoNorm):
        return _nonorm_epilogue(y, bias, residual, norm.weight, norm.bias)
    return bias_residual_layernorm(y, bias, residual, norm.weight, norm.bias, norm.eps)


class DenseResidualNorm(nn.Module):
    """``norm(dropout(dense(x)) + residual)``; state-dict names ``dense.*`` and ``LayerNorm.*``."""

    def __init__(self, d_in: int, d_out: int, kind: str, eps: float | None, dropout: float = 0.0):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = _norm(kind, d_out, eps)
        self.dropout_p = float(dropout)

    def forward(self, x, residual):
        y = F.linear(x, self.dense.weight)
        bias = self.dense.bias
        if self.dropout_p > 0.0 and self.training:
            y = F.dropout(y + bias, self.dropout_p, True)
            bias = None
        return residual_norm(y, bias, residual, self.LayerNorm)


class Embeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.trigram_input = config.trigram_input
        self.embedding_size = config.embedding_size
        self.hidden_size = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, config.embedding_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        width = config.embedding_size * (3 if config.trigram_input else 1)
        self.embedding_transformation = nn.Linear(width, config.hidden_size)
        self.LayerNorm = _norm(config.normalization_type, config.hidden_size, None)  # transformers passes no eps
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.register_buffer("position_ids", torch.arange(config.max_position_embeddings).expand(1, -1),
                             persistent=False)

    def forward(self, input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None):
        x = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        seq_len = x.shape[1]
        if self.trigram_input:
            # kernel-3 "convolution": [next token, this token, previous token], zero-padded at the ends
            x = torch.cat([F.pad(x[:, 1:], (0, 0, 0, 1)), x, F.pad(x[:, :-1], (0, 0, 1, 0))], dim=2)
        if self.trigram_input or self.embedding_size != self.hidden_size:
            x = self.embedding_transformation(x)
        if position_ids is None:
            position_ids = self.position_ids[:, :seq_len]
        if token_type_ids is None:
            token_type_ids = torch.zeros(x.shape[:2], dtype=torch.long, device=x.device)
        x = x + self.position_embeddings(position_ids) + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class SelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        t = _true_hidden(config)
        self.num_heads = config.num_attention_heads
        self.head_dim = t // config.num_attention_heads
        all_head = self.num_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        bottleneck_qk = config.use_bottleneck and (config.use_bottleneck_attention or config.key_query_shared_bottleneck)
        qk_in = t if bottleneck_qk else config.hidden_size  # == transformers' true_hidden_size whenever it runs
        v_in = t if config.use_bottleneck_attention else config.hidden_size
        self.query = nn.Linear(qk_in, all_head)
        self.key = nn.Linear(qk_in, all_head)
        self.value = nn.Linear(v_in, all_head)
        self.dropout_p = float(config.attention_probs_dropout_prob)

    def _heads(self, x):
        b, l, _ = x.shape
        return x.view(b, l, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, q_in, k_in, v_in, mask, want_maps: bool, want_qk: bool):
        """Returns ``(context [B, L, H*dh], captured: dict)``; ``captured`` may hold ``scores``
        (pre-softmax, scaled, additive mask applied), ``attentions`` (probabilities), ``q`` (pre-scaled by
        ``1/sqrt(dh)`` so ``softmax(q k^T + mask)`` reproduces the attention) and ``k``."""
        return self.attend(self.query(q_in), self.key(k_in), self.value(v_in), mask, want_maps, want_qk)

    def attend(self, q, k, v, mask, want_maps: bool, want_qk: bool):
        """Attention from projected ``q, k, v`` ``[B, L, H*dh]``; returns what :meth:`forward` returns."""
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        p = self.dropout_p if self.training else 0.0
        captured = {}
        if want_maps:
            scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale
            if mask is not None:
                scores = scores + mask
            probs = torch.softmax(scores, dim=-1)
            ctx = torch.matmul(F.dropout(probs, p, True) if p > 0 else probs, v)
            captured["scores"] = scores
            captured["attentions"] = probs
        else:
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=self.scale)
        if want_qk:
            captured["q"] = q * self.scale
            captured["k"] = k
        b, _, l, _ = ctx.shape
        return ctx.transpose(1, 2).reshape(b, l, -1), captured


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        t = _true_hidden(config)
        self.self = SelfAttention(config)
        self.output = DenseResidualNorm(t, t, config.normalization_type, config.layer_norm_eps,
                                        0.0 if config.use_bottleneck else config.hidden_dropout_prob)


class Intermediate(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(_true_hidden(config), config.intermediate_size)


class LayerOutput(nn.Module):
    """Last FFN's output projection (+ residual + norm) and, with bottlenecks, the 128 -> 512 output
    bottleneck (+ residual to the block input + norm)."""

    def __init__(self, config):
        super().__init__()
        t = _true_hidden(config)
        self.use_bottleneck = config.use_bottleneck
        self.dense = nn.Linear(config.intermediate_size, t)
        self.LayerNorm = _norm(config.normalization_type, t, None)  # transformers passes no eps here
        if config.use_bottleneck:
            self.bottleneck = DenseResidualNorm(t, config.hidden_size, config.normalization_type,
                                                config.layer_norm_eps, config.hidden_dropout_prob)


class FFNLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        t = _true_hidden(config)
        self.intermediate = Intermediate(config)
        self.output = DenseResidualNorm(config.intermediate_size, t, config.normalization_type, config.layer_norm_eps)


class BottleneckLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intra_bottleneck_size)
        self.LayerNorm = _norm(config.normalization_type, config.intra_bottleneck_size, config.layer_norm_eps)

    def forward(self, x):
        return self.LayerNorm(self.dense(x))


class Bottleneck(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input = BottleneckLayer(config)
        if config.key_query_shared_bottleneck:  # built even when unused (use_bottleneck_attention), as transformers
            self.attention = BottleneckLayer(config)


def _norm_params(norm: nn.Module):
    if isinstance(norm, NoNorm):
        return norm.weight, norm.bias, 0.0
    return norm.weight, norm.bias, norm.eps


class MobileBertLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.use_bottleneck = config.use_bottleneck
        self.use_bottleneck_attention = config.use_bottleneck_attention
        self.key_query_shared_bottleneck = config.key_query_shared_bottleneck
        self.normalization_type = config.normalization_type
        self.hidden_dropout_prob = float(config.hidden_dropout_prob)
        self.act = _activation(config.hidden_act)
        # registration order = transformers' (attention, intermediate, output, bottleneck, ffn)
        self.attention = Attention(config)
        self.intermediate = Intermediate(config)
        self.output = LayerOutput(config)
        if config.use_bottleneck:
            self.bottleneck = Bottleneck(config)
        if config.num_feedforward_networks > 1:
            self.ffn = nn.ModuleList([FFNLayer(config) for _ in range(config.num_feedforward_networks - 1)])

    def ffn_params(self) -> list[FFNParams]:
        """All FFNs of the block in execution order (the stacked ones, then the block's own)."""
        out = []
        for f in getattr(self, "ffn", ()):
            g, b, eps = _norm_params(f.output.LayerNorm)
            out.append(FFNParams(f.intermediate.dense.weight, f.intermediate.dense.bias,
                                 f.output.dense.weight, f.output.dense.bias, g, b, eps))
        g, b, eps = _norm_params(self.output.LayerNorm)
        out.append(FFNParams(self.intermediate.dense.weight, self.intermediate.dense.bias,
                             self.output.dense.weight, self.output.dense.bias, g, b, eps))
        return out

    def forward(self, hidden, mask=None, want_maps=False, want_qk=False):
        inputs, ffn_chain = _block_steps()
        layer_input, q, k, v = inputs(self, hidden)
        ctx, captured = self.attention.self.attend(q, k, v, mask, want_maps, want_qk)
        x = self.attention.output(ctx, layer_input)
        x = ffn_chain(
            x, self.ffn_params(), self.act, self.normalization_type,
            dropout_last=0.0 if self.use_bottleneck else self.hidden_dropout_prob, training=self.training,
        )
        if self.use_bottleneck:
            x = self.output.bottleneck(x, hidden)
        return x, captured


class Encoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer = nn.ModuleList([MobileBertLayer(config) for _ in range(config.num_hidden_layers)])


class Pooler(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.do_activate = config.classifier_activation
        if self.do_activate:
            self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden):
        first = hidden[:, 0]
        return torch.tanh(self.dense(first)) if self.do_activate else first


@dataclass
class KDMobileBertOutput:
    """Model outputs. Per-layer tuples have ``num_hidden_layers`` entries except ``hidden_states``
    (``num_hidden_layers + 1``: the embedding output first, as ``output_hidden_states`` in transformers)."""

    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor | None = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None
    scores: tuple | None = None
    queries: tuple | None = None
    keys: tuple | None = None
    logits: torch.Tensor | None = None
    loss: torch.Tensor | None = None


def _parse_capture(capture) -> frozenset:
    if capture is None:
        return frozenset()
    kinds = frozenset([capture] if isinstance(capture, str) else capture)
    unknown = kinds - CAPTURE_KINDS
    if unknown:
        raise ValueError(f"capture must be a subset of {sorted(CAPTURE_KINDS)}, got unknown {sorted(unknown)}")
    return kinds


def additive_mask(attention_mask, dtype):
    """``[B, L]`` 0/1 key mask -> ``[B, 1, 1, L]`` additive mask (0 keep, ``finfo(dtype).min`` drop), the
    same values transformers' eager attention adds. 4-D float masks pass through; 4-D bool masks
    (True = keep) are converted."""
    if attention_mask is None:
        return None
    if attention_mask.dim() == 4 and attention_mask.dtype != torch.bool:
        return attention_mask.to(dtype)
    keep = attention_mask.bool()
    if keep.dim() == 2:
        keep = keep[:, None, None, :]
    zero = torch.zeros((), dtype=dtype, device=keep.device)
    return torch.where(keep, zero, torch.finfo(dtype).min)


def _init_weights(module: nn.Module, std: float):
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, (NoNorm, nn.LayerNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class KDMobileBert(nn.Module):
    """MobileBERT encoder (``transformers.MobileBertModel`` equivalent).

    ``forward(input_ids, attention_mask=None, token_type_ids=None, position_ids=None, inputs_embeds=None,
    capture=())`` with ``capture`` a subset of:

    * ``"hidden"``: ``hidden_states`` (embedding output + each layer's output, ``[B, L, hidden_size]``);
    * ``"qk"``: ``queries``/``keys`` per layer ``[B, H, L, dh]``, queries pre-scaled by ``1/sqrt(dh)``
      (so ``softmax(q @ k^T + mask)`` is the attention); attention still runs through SDPA;
    * ``"scores"``: pre-softmax scores ``q k^T / sqrt(dh) + mask`` ``[B, H, L, L]`` (mask value
      ``finfo(dtype).min`` at padded keys, as transformers' eager attention);
    * ``"attentions"``: attention probabilities (``output_attentions`` in transformers).

    ``"scores"``/``"attentions"`` compute the ``L x L`` maps explicitly for every layer; the others never do.
    Use bf16 on GPU; fp16 overflows in MobileBERT (see module docstring).
    """

    def __init__(self, config, add_pooling_layer: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)
        self.pooler = Pooler(config) if add_pooling_layer else None
        _init_weights(self, config.initializer_range)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, capture=()):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("exactly one of input_ids and inputs_embeds must be given")
        kinds = _parse_capture(capture)
        want_maps = bool(kinds & {"scores", "attentions"})
        want_qk = "qk" in kinds
        x = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds)
        mask = additive_mask(attention_mask, x.dtype)
        hidden = [x] if "hidden" in kinds else None
        caps = {"scores": [], "attentions": [], "q": [], "k": []}
        for layer in self.encoder.layer:
            x, captured = layer(x, mask, want_maps, want_qk)
            if hidden is not None:
                hidden.append(x)
            for key, value in captured.items():
                caps[key].append(value)
        return KDMobileBertOutput(
            last_hidden_state=x,
            pooler_output=self.pooler(x) if self.pooler is not None else None,
            hidden_states=tuple(hidden) if hidden is not None else None,
            attentions=tuple(caps["attentions"]) if "attentions" in kinds else None,
            scores=tuple(caps["scores"]) if "scores" in kinds else None,
            queries=tuple(caps["q"]) if want_qk else None,
            keys=tuple(caps["k"]) if want_qk else None,
        )

    @classmethod
    def from_transformers(cls, hf_model):
        """Build from a ``transformers.MobileBertModel`` (copying its weights)."""
        model = cls(hf_model.config, add_pooling_layer=getattr(hf_model, "pooler", None) is not None)
        model.load_state_dict(hf_model.state_dict())
        return model.to(next(hf_model.parameters()).dtype)

    def to_transformers(self):
        """A ``transformers.MobileBertModel`` with these weights (fails for configurations transformers
        cannot represent, e.g. ``ib-bert``; see the module docstring)."""
        from transformers import MobileBertModel

        hf = MobileBertModel(self.config, add_pooling_layer=self.pooler is not None)
        hf.load_state_dict(self.state_dict())
        return hf.eval() if not self.training else hf


class PredictionHeadTransform(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = _activation(config.hidden_act)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # always LayerNorm

    def forward(self, x):
        return self.LayerNorm(self.act(self.dense(x)))


class LMPredictionHead(nn.Module):
    """Output embedding of width ``hidden_size`` = the tied ``[V, embedding_size]`` word embedding
    (``decoder.weight``) concatenated with an untied ``[hidden_size - embedding_size, V]`` block
    (``dense.weight``, stored transposed as in transformers)."""

    def __init__(self, config):
        super().__init__()
        self.embedding_size = config.embedding_size
        self.transform = PredictionHeadTransform(config)
        with warnings.catch_warnings():  # hidden_size == embedding_size leaves this block empty, on purpose
            warnings.filterwarnings("ignore", "Initializing zero-element tensors is a no-op")
            self.dense = nn.Linear(config.vocab_size, config.hidden_size - config.embedding_size, bias=False)
        self.decoder = nn.Linear(config.embedding_size, config.vocab_size, bias=True)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.decoder.bias = self.bias

    def output_weight(self):
        """The full ``[V, hidden_size]`` LM matrix (for fused linear-KD losses): ``logits = h W^T + bias``."""
        return torch.cat([self.decoder.weight, self.dense.weight.t()], dim=1)

    def forward(self, x):
        t = self.transform(x)
        e = self.embedding_size
        # = t @ cat([decoder.weight^T, dense.weight]) + bias, without materialising the concatenation
        logits = F.linear(t[..., :e], self.decoder.weight, self.decoder.bias)
        if t.shape[-1] > e:
            logits = logits + torch.matmul(t[..., e:], self.dense.weight)
        return logits


class OnlyMLMHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.predictions = LMPredictionHead(config)


class KDMobileBertForMaskedLM(nn.Module):
    """MobileBERT with the MLM head (``transformers.MobileBertForMaskedLM`` equivalent). ``forward`` takes
    the arguments of :class:`KDMobileBert` plus ``labels`` (-100 = ignored) and returns a
    :class:`KDMobileBertOutput` with ``logits`` (and ``loss`` when labels are given)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.mobilebert = KDMobileBert(config, add_pooling_layer=False)
        self.cls = OnlyMLMHead(config)
        _init_weights(self.cls, config.initializer_range)
        self.tie_weights()

    def tie_weights(self):
        if getattr(self.config, "tie_word_embeddings", True):
            self.cls.predictions.decoder.weight = self.mobilebert.embeddings.word_embeddings.weight
        self.cls.predictions.decoder.bias = self.cls.predictions.bias

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, capture=()):
        out = self.mobilebert(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, capture)
        out.logits = self.cls.predictions(out.last_hidden_state)
        if labels is not None:
            out.loss = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]).float(), labels.reshape(-1),
                                       ignore_index=-100)
        return out

    @classmethod
    def from_transformers(cls, hf_model):
        """Build from a ``transformers.MobileBertForMaskedLM`` (copying its weights)."""
        model = cls(hf_model.config)
        model.load_state_dict(hf_model.state_dict())
        return model.to(next(hf_model.parameters()).dtype)

    def to_transformers(self):
        from transformers import MobileBertForMaskedLM

        hf = MobileBertForMaskedLM(self.config)
        hf.load_state_dict(self.state_dict())
        return hf.eval() if not self.training else hf
