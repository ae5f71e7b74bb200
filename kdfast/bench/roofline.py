"""Roofline floors of the GPU benchmark rows: the least time a GPU can take for what a row must do.

Each row's case must move some bytes through device memory and do some FLOPs (and, for the
soft-max losses, some exponentials). Its floor on a GPU is the slowest of the three at the GPU's
published peak rates (:data:`GPUS`):

    floor = max(bytes / HBM bandwidth, FLOPs / peak of the units that do them, exp / SFU rate)

The counts are the least any implementation of the case needs, not what kdfast does: every input
read once, every output written once, nothing else stored (the logits of fused linear KD, the
attention maps of attention transfer from Q/K never exist), each product computed once. So
``measured / floor`` says how far a row is from the hardware, for kdfast and its baselines alike.
The formulas are in each function's docstring; ``b`` is the element size in bytes. FLOPs count a
multiply-add as 2; fp32 GEMMs run on the FP32 units (PyTorch's default, and the attention kernels'
``ieee`` precision), bf16 ones on the tensor cores.

:func:`work_for_row` reads a benchmark row's suite and case label (``"KL B=32 H=12 L=4096 dh=64
w=64"``: ``w=`` or ``window=`` marks a sliding window) and returns its :class:`Work`;
``benchmarks/gpu_check.py`` prints the floors and ``measured / floor`` beside every row.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MASK_FRACTION = 0.15  # the recipes' MLM masking probability: rows of masked-only KD and MLM


@dataclass(frozen=True)
class Gpu:
    """Published peak rates of one GPU (per second)."""

    name: str
    hbm_bytes: float
    bf16_flops: float  # dense tensor-core bf16
    fp32_flops: float  # FP32 units (no tensor cores)
    sfu_exp: float  # exponentials: 16 per SM per clock x SMs x boost clock
    source: str


# NVIDIA H100 Tensor Core GPU datasheet (H100 SXM5 80 GB): HBM3 3.35 TB/s; BF16 tensor core 1,979
# TFLOPS with 2:4 sparsity, i.e. 989 TFLOPS dense; FP32 67 TFLOPS. NVIDIA H200 Tensor Core GPU datasheet
# (H200 SXM 141 GB): HBM3e 4.8 TB/s, the same GH100 compute (989 dense bf16, 67 FP32). Exponentials: CUDA
# C++ Programming Guide, "Arithmetic Instructions" throughput table: 16 exp2 per SM per clock on compute
# capability 9.0; 132 SMs at 1.98 GHz boost (NVIDIA H100 Tensor Core GPU Architecture whitepaper).
GPUS: dict[str, Gpu] = {
    "h100": Gpu("H100 SXM", 3.35e12, 989e12, 67e12, 16 * 132 * 1.98e9,
                "NVIDIA H100 datasheet: 3.35 TB/s HBM3, 989 TFLOP/s dense bf16, 67 TFLOP/s fp32"),
    "h200": Gpu("H200 SXM", 4.8e12, 989e12, 67e12, 16 * 132 * 1.98e9,
                "NVIDIA H200 datasheet: 4.8 TB/s HBM3e, 989 TFLOP/s dense bf16, 67 TFLOP/s fp32"),
}
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class Work:
    """What one row must do: bytes through device memory, FLOPs (on ``flop_unit``: ``"bf16"`` tensor
    cores or ``"fp32"`` units), exponentials; ``formula`` says how they were counted."""

    bytes: float
    flops: float
    flop_unit: str
    exps: float = 0.0
    formula: str = ""

    def times_s(self, gpu: Gpu) -> dict[str, float]:
        """Seconds at each roof: memory, compute, sfu."""
        peak = gpu.bf16_flops if self.flop_unit == "bf16" else gpu.fp32_flops
        return {"memory": self.bytes / gpu.hbm_bytes, "compute": self.flops / peak, "sfu": self.exps / gpu.sfu_exp}

    def floor_ms(self, gpu: Gpu) -> float:
        return 1e3 * max(self.times_s(gpu).values())

    def bound(self, gpu: Gpu) -> str:
        t = self.times_s(gpu)
        return max(t, key=lambda k: t[k])


def _unit(dtype: str) -> str:
    return "bf16" if dtype in ("bfloat16", "float16") else "fp32"


def logit_kd(N: int, V: int, dtype: str, producer: bool = False) -> Work:
    """Fused logit KD, forward + backward: read student and teacher logits, write the gradient.

    bytes = 3 N V b (+ 2 N V b for the producing op of a ``+producer`` case: it reads and writes the
    logits once); FLOPs = 8 N V on the FP32 units (running max / sum updates, the gradient); exp = 2 N V
    (p_s and p_t once per element)."""
    b = DTYPE_BYTES[dtype]
    return Work((5 if producer else 3) * N * V * b, 8 * N * V, "fp32", 2 * N * V,
                f"bytes {5 if producer else 3}NVb, FLOPs 8NV fp32, exp 2NV")


def fused_linear_kd(N: int, rows: int, V: int, d_s: int, d_t: int, dtype: str) -> Work:
    """LM heads + logit KD on ``rows`` of ``N`` tokens (masked KD), forward + backward to h_s, W_s, b_s.

    FLOPs = 2 R V (3 d_s + d_t): student logits, teacher logits, grad_h = G W_s, grad_W = G^T h_s;
    exp = 2 R V; bytes = b [V (2 d_s + d_t + 3) + R (d_s + d_t) + N d_s] + 8 N: both heads and biases
    read, grad_W and grad_b written, the kept rows of h_s and h_t read, grad_h written for every token,
    labels read; the R x V logits never stored."""
    b = DTYPE_BYTES[dtype]
    return Work(b * (V * (2 * d_s + d_t + 3) + rows * (d_s + d_t) + N * d_s) + 8 * N,
                2 * rows * V * (3 * d_s + d_t), _unit(dtype), 2 * rows * V,
                "FLOPs 2RV(3d_s+d_t), bytes b[V(2d_s+d_t+3)+R(d_s+d_t)+Nd_s]+8N, exp 2RV")


def attention_pairs(L: int, window: int | None) -> int:
    """(query, key) pairs of one head: L^2, or L (2w + 1) - w (w + 1) inside the band |i - j| <= w."""
    if window is None or window >= L - 1:
        return L * L
    return L * (2 * window + 1) - window * (window + 1)


def attention_qk(B: int, H: int, L: int, d_s: int, d_t: int, loss: str, dtype: str = "float32",
                 window: int | None = None) -> Work:
    """Attention transfer from Q/K, forward + backward to Q_s and K_s, without the L x L maps.

    P = B H pairs(L, w) (:func:`attention_pairs`); FLOPs = 2 P (3 d_s + d_t): S_s = Q_s K_s^T,
    S_t = Q_t K_t^T, dQ_s = dS K_s, dK_s = dS^T Q_s; exp = 2 P for KL (p_s and p_t), 0 for MSE;
    bytes = B H L b (2 d_s + 2 d_t) reads + B H L b 2 d_s gradient writes + B L key mask + 4 B H L row
    losses. Every pair in the band counts (the case label does not carry the key padding)."""
    b, P, n = DTYPE_BYTES[dtype], B * H * attention_pairs(L, window), B * H * L
    return Work(n * b * (4 * d_s + 2 * d_t) + B * L + 4 * n, 2 * P * (3 * d_s + d_t), _unit(dtype),
                2 * P if loss.lower() == "kl" else 0,
                f"FLOPs 2P(3d_s+d_t), P=BH·{'L^2' if window is None else 'band(L,w)'}, bytes BHLb(4d_s+2d_t)"
                + (", exp 2P" if loss.lower() == "kl" else ""))


def score_map_mse(B: int, H: int, L: int, dtype: str = "float32") -> Work:
    """Score-map MSE on materialised [B, H, L, L] maps: read both maps, write the gradient.

    bytes = 3 B H L^2 b + B L; FLOPs = 4 B H L^2 (difference, square-accumulate, gradient)."""
    n = B * H * L * L
    return Work(3 * n * DTYPE_BYTES[dtype] + B * L, 4 * n, _unit(dtype), 0, "bytes 3BHL^2b, FLOPs 4BHL^2")


def hidden_mse(N: int, d_s: int, d_t: int, dtype: str = "float32") -> Work:
    """Hidden MSE through a projection (Y = h_s W^T + b, MSE(Y, h_t)), forward + backward to h_s, W, b.

    FLOPs = 6 N d_s d_t (Y, dh_s = dY W, dW = dY^T h_s); bytes = b (2 N d_s + N d_t + 2 d_s d_t + 2 d_t):
    h_s, h_t, W, b read, dh_s, dW, db written, Y never stored."""
    return Work(DTYPE_BYTES[dtype] * (2 * N * d_s + N * d_t + 2 * d_s * d_t + 2 * d_t), 6 * N * d_s * d_t,
                _unit(dtype), 0, "FLOPs 6N d_s d_t, bytes b(2N d_s + N d_t + 2 d_s d_t)")


def cosine(N: int, d: int, dtype: str = "float32") -> Work:
    """Cosine loss, forward + backward: read both rows, write the gradient. bytes = 3 N d b; FLOPs = 10 N d."""
    return Work(3 * N * d * DTYPE_BYTES[dtype], 10 * N * d, _unit(dtype), 0, "bytes 3Ndb, FLOPs 10Nd")


def _layer_flops(d: int, ffn: int, seq: int) -> float:
    """Forward FLOPs of one encoder layer per token: Q, K, V, O and the two FFN GEMMs, then the
    attention scores and their weighted sum over ``seq`` keys."""
    return 2 * (4 * d * d + 2 * d * ffn) + 4 * seq * d


def _encoder_params(layers: int, d: int, ffn: int, vocab: int) -> float:
    return layers * (4 * d * d + 2 * d * ffn + 9 * d + ffn) + (vocab + 514) * d


def recipe_step(step: str, batch: int, seq: int, tokens: int, teacher: dict, student: dict, *,
                kd_rows: str = "all", from_cache: bool = False, vocab: int = 30522) -> Work:
    """A whole distillation step (teacher forward unless ``from_cache``, student forward + backward,
    AdamW with gradient clipping) under bf16 autocast, for ``tokens`` real tokens of ``batch`` x ``seq``.

    FLOPs = tokens (F_t + 3 F_s) + head rows x (2 d^2 + 2 d V) (x 3 for the student), with
    F = layers x (2 (4 d^2 + 2 d d_ff) + 4 L d) per token (:func:`_layer_flops`); DistilBERT's heads
    run on every token (``kd_rows="all"``) or on the 15% masked ones, TinyBERT has no head and
    projects its layers and embeddings (5 x 2 d_s d_t per token, x 3); exp = 2 x rows x V for KD.
    bytes = 48 B per student parameter (fp32 weights read in forward and backward, gradients written,
    the norm's pass over them, AdamW reading p, g, m, v and writing p, m, v, the grads zeroed) + 4 B per
    live teacher parameter. Activations and the encoders' own soft-max exponentials (under a tenth of the
    GEMM floor at these shapes) are not counted, and the floor is max over the step's totals,
    so it is a loose lower bound: the step's kernels one after another cannot beat it."""
    L_t, d_t, f_t = teacher["layers"], teacher["d"], teacher["ffn"]
    L_s, d_s, f_s = student["layers"], student["d"], student["ffn"]
    masked = max(1, round(MASK_FRACTION * tokens))

    def head(d: int) -> float:  # the MLM head of one row: transform + decoder
        return 2 * d * d + 2 * d * vocab

    fs, ft = L_s * _layer_flops(d_s, f_s, seq), L_t * _layer_flops(d_t, f_t, seq)
    if step == "distilbert":
        kd = tokens if kd_rows.startswith("all") else masked
        student_f = tokens * fs + max(kd, masked) * head(d_s)
        teacher_f = tokens * ft + kd * head(d_t)
        exps = 2 * kd * vocab
    elif step == "tinybert":
        student_f = tokens * (fs + (L_s + 1) * 2 * d_s * d_t)
        teacher_f = tokens * ft
        exps = 0
    else:
        raise ValueError(f"step must be 'distilbert' or 'tinybert', got {step!r}")
    flops = 3 * student_f + (0 if from_cache else teacher_f)
    nbytes = 48 * _encoder_params(L_s, d_s, f_s, vocab) + (0 if from_cache else 4 * _encoder_params(L_t, d_t, f_t,
                                                                                                       vocab))
    return Work(nbytes, flops, "bf16", exps, "FLOPs tokens(F_t + 3F_s) + heads; bytes 48/student param + 4/teacher")


# --- benchmark rows -> work ------------------------------------------------------------------------

def _kv(case: str) -> dict[str, str]:
    return dict(re.findall(r"\b(\w+)=(\S+)", case))


def _dtype(case: str, default: str = "float32") -> str:
    m = re.search(r"\b(float32|float16|bfloat16)\b", case)
    return m.group(1) if m else default


def _e2e_models(step: str, t_layers: int, t_d: int) -> tuple[dict, dict] | None:
    """(teacher, student) shapes of an e2e case, from kdfast.bench.e2e.SHAPES (matched by the teacher's
    layers x width) and the recipes' students: DistilBERT every other teacher layer at the teacher's
    width, TinyBERT the tinybert-4 preset (layers: the largest divisor of the teacher's depth <= 4)."""
    from kdfast.bench.e2e import SHAPES
    from kdfast.models.students import TINYBERT_PRESETS

    shape = next((s for s in SHAPES.values() if s["teacher"]["num_hidden_layers"] == t_layers
                  and s["teacher"]["hidden_size"] == t_d), None)
    if shape is None:
        return None
    teacher = {"layers": t_layers, "d": t_d, "ffn": shape["teacher"]["intermediate_size"]}
    if step == "distilbert":
        return teacher, {**teacher, "layers": (t_layers + 1) // 2}
    preset = {**TINYBERT_PRESETS["tinybert-4"],
              **{k.removeprefix("student."): v for k, v in shape["tinybert"].items()}}
    layers = max(n for n in range(1, min(4, t_layers) + 1) if t_layers % n == 0)
    return teacher, {"layers": layers, "d": preset["hidden_size"], "ffn": preset["intermediate_size"]}


def work_for_row(suite: str, case: str, impl: str = "", extra: dict | None = None, *, vocab: int = 30522,
                 teacher_hidden: int = 768) -> Work | None:
    """The :class:`Work` of one benchmark row (suites kd_loss, attention, flkd, e2e of
    ``benchmarks/gpu_check.py``), from its case label; ``vocab`` and ``teacher_hidden``: the fused
    linear KD case's (its label does not carry them). None for a row this model does not know."""
    kv, extra = _kv(case), extra or {}
    try:
        if suite == "kd_loss" and "N" in kv and "V" in kv:
            return logit_kd(int(kv["N"]), int(kv["V"]), _dtype(case), producer="+producer" in case)
        if suite == "attention":
            if re.match(r"(KL|MSE) ", case):
                w = kv.get("w", kv.get("window"))
                return attention_qk(int(kv["B"]), int(kv["H"]), int(kv["L"]), int(kv["dh"]), int(kv["dh"]),
                                    case.split()[0], _dtype(case), int(w) if w else None)
            if case.startswith("map MSE"):
                return score_map_mse(int(kv["B"]), int(kv["H"]), int(kv["L"]), _dtype(case))
            m = re.match(r"hidden MSE N=(\d+) (\d+)->(\d+)", case)
            if m:
                return hidden_mse(*map(int, m.groups()), _dtype(case))
            if case.startswith("cosine"):
                return cosine(int(kv["N"]), int(kv["d"]), _dtype(case))
        if suite == "flkd":
            m = re.match(r"(\d+)x(\d+) tok \((\d+) masked\)", case)
            if m:
                B, L, rows = map(int, m.groups())
                return fused_linear_kd(B * L, rows, vocab, int(kv["d_s"]), teacher_hidden, _dtype(case))
        if suite == "e2e":
            m = re.match(r"(distilbert|tinybert) (\d+)x(\d+)(?: (\d+)% full)? teacher (\d+)x(\d+)", case)
            if m:
                step, B, L, fill, t_layers, t_d = m.groups()
                models = _e2e_models(step, int(t_layers), int(t_d))
                if models is None:
                    return None
                tokens = int(extra.get("tokens") or round(int(B) * int(L) * (int(fill or 100) / 100)))
                kd_rows = str(extra.get("kd_rows", "all"))
                return recipe_step(step, int(B), int(L), tokens, *models, kd_rows=kd_rows,
                                   from_cache="cache" in impl, vocab=vocab)
    except (KeyError, ValueError):
        return None
    return None


def gpu_for_device(name: str) -> str | None:
    """The :data:`GPUS` key of a device name ('NVIDIA H200' -> 'h200'; an H100 other than SXM -> None)."""
    n = name.upper()
    if "H200" in n:
        return "h200"
    if "H100" in n and "PCIE" not in n and "NVL" not in n:
        return "h100"
    return None


def floor_extra(work: Work | None, ms: float | None, device: str) -> dict:
    """The fields a row carries: floor_ms per GPU, the bound, and x_floor (measured / floor) on a known GPU."""
    if work is None:
        return {}
    out = {"floor_ms": {k: float(f"{work.floor_ms(g):.4g}") for k, g in GPUS.items()},
           "floor_bound": {k: work.bound(g) for k, g in GPUS.items()}}
    key = gpu_for_device(device)
    if key and ms:
        out["x_floor"] = round(ms / work.floor_ms(GPUS[key]), 2)
    return out


def format_floors(rows: list[dict], device: str) -> str:
    """Every row beside its floor on each GPU and, on a known GPU, measured / floor."""
    key = gpu_for_device(device)
    head = (f"{'suite':<10} {'case':<44} {'impl':<34} {'ms':>9} {'H100 floor':>10} {'H200 floor':>10} "
            f"{'bound':<8} {'measured/floor':>14}")
    lines = [head, "-" * len(head)]
    for r in rows:
        fl = r.get("extra", {}).get("floor_ms")
        if not fl:
            continue
        ms = r.get("ms")
        ratio = f"{ms / fl[key]:.2f}x ({GPUS[key].name})" if key and ms else "-"
        lines.append(f"{r['suite']:<10} {r['case'][:44]:<44} {r['impl'][:34]:<34} "
                     f"{f'{ms:.3f}' if ms else '-':>9} {fl['h100']:>10.4g} {fl['h200']:>10.4g} "
                     f"{r['extra']['floor_bound'][key or 'h100']:<8} {ratio:>14}")
    return "\n".join(lines)


# The GPU check's rows at the GPU's shapes (benchmarks/gpu_check.py SHAPES; attention also at L = 4,096 and
# 8,192, global and with a 64-token window), for the table in benchmarks/README.md.
README_ROWS = [
    ("kd_loss", "N=16384 V=30522 bfloat16", "", {}),
    ("kd_loss", "N=16384 V=30522 bfloat16 +producer", "", {}),
    ("flkd", "32x128 tok (614 masked) d_s=768 bfloat16", "", {}),
    ("flkd", "32x128 tok (614 masked) d_s=768 float32", "", {}),
    *[("attention", f"{loss} B=32 H=12 L={L} dh=64{w}", "", {})
      for L in (512, 4096, 8192) for w in ("", " w=64") for loss in ("KL", "MSE")],
    ("attention", "map MSE B=32 H=12 L=128", "", {}),
    ("attention", "hidden MSE N=4096 312->768", "", {}),
    ("attention", "cosine N=4096 d=768", "", {}),
    ("e2e", "distilbert 32x512 teacher 12x768 bf16", "live teacher", {"kd_rows": "all real tokens"}),
    ("e2e", "distilbert 32x512 teacher 12x768 bf16", "live teacher", {"kd_rows": "masked"}),
    ("e2e", "distilbert 32x512 teacher 12x768 bf16", "from the cache", {"kd_rows": "masked (top-32)"}),
    ("e2e", "tinybert 32x512 teacher 12x768 bf16", "live teacher", {"kd_rows": "-"}),
]


def markdown_table(rows=README_ROWS) -> str:
    """The README's table: per row its bytes, FLOPs, exponentials, and floor on each GPU (ms, bound)."""
    out = ["| row | bytes | FLOPs (units) | exp | H100 SXM floor | H200 floor |", "|---|---:|---:|---:|---:|---:|"]
    for suite, case, impl, extra in rows:
        w = work_for_row(suite, case, impl, extra)
        label = f"{suite}: {case}" + (f", {impl}" if impl else "") + (f" (KD rows: {extra['kd_rows']})"
                                                                       if extra.get("kd_rows", "-") != "-" else "")
        out.append(f"| {label} | {w.bytes / 1e6:,.1f} MB | {w.flops / 1e9:,.1f} G ({w.flop_unit}) | "
                   f"{w.exps / 1e9:,.3f} G | " + " | ".join(f"{w.floor_ms(g):.4f} ms ({w.bound(g)})"
                                                           for g in GPUS.values()) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    print(markdown_table())
