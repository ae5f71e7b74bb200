"""Layer transfer, forward + backward, at BERT-base shapes.

- attention, KL and MSE: the materialised eager loss (what people write: scores = q k^T /
  sqrt(dh) + mask, then log_softmax + KL, or the masked squared error) against kdfast's KL on
  materialised maps and its flash transfer from Q and K (no L x L map) on every backend that
  runs here: Triton (``auto`` on CUDA), and on CPU tensors the ``torch`` backend (chunks of
  query rows) and the C++ ``cpu`` kernel;
- hidden states: TinyBERT's MSE through a learned projection (student 312 -> teacher 768), eager
  ``F.mse_loss(F.linear(h_s, W, b), h_t)`` against kdfast's fused ``hidden_mse_loss``, and
  DistilBERT's cosine loss (768 wide) against eager ``F.cosine_embedding_loss``, each with the
  torch and (on CPU) the C++ epilogue / row kernel;
- ``torch.compile`` of each eager attention / hidden loss with ``compile_baseline`` (``make gpu-check``);
- map MSE: TinyBERT's score MSE on given [B, H, L, L] maps (the maps are the inputs, so only the
  loss is timed), eager against ``attention_mse_loss`` on each backend (on CPU: the torch backend,
  which also materialises L x L temporaries, and the C++ row kernels).

:func:`report` prints the table against eager and, for the CPU backends, the C++ kernels
against the torch backend of the same case.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import kdfast
from kdfast.bench import BenchOptions, Progress, Table
from kdfast.bench.timing import Entry, Result, format_table, measure_all

SUITE = "attention"


def eager_scores(q, k, key_mask):
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return s.masked_fill(~key_mask[:, None, None, :], -10000.0)


def eager_kl(q_s, k_s, q_t, k_t, key_mask):
    """KL(softmax(teacher scores) || softmax(student scores)) per real query row, mean over rows."""
    log_s = F.log_softmax(eager_scores(q_s, k_s, key_mask), -1)
    with torch.no_grad():
        log_t = F.log_softmax(eager_scores(q_t, k_t, key_mask), -1)
    rows = (log_t.exp() * (log_t - log_s)).sum(-1)  # [B, H, L]
    m = key_mask[:, None, :].expand_as(rows)
    return rows[m].mean()


def eager_mse(q_s, k_s, q_t, k_t, key_mask):
    """TinyBERT score MSE over the (real query, real key) pairs of every head."""
    with torch.no_grad():
        t = eager_scores(q_t, k_t, key_mask)
    return eager_map_mse(eager_scores(q_s, k_s, key_mask), t, key_mask)


def eager_map_mse(s, t, key_mask):
    """The same on given score maps."""
    counted = key_mask[:, None, :, None] & key_mask[:, None, None, :]      # [B, 1, L, L]
    diff = torch.where(counted, s - t, 0.0)
    return (diff * diff).sum() / (counted.sum() * s.shape[1])


def _inputs(B, H, L, dh_s, dh_t, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    q_s, k_s = (torch.randn(B, H, L, dh_s, generator=g).to(device) for _ in range(2))
    q_t, k_t = (torch.randn(B, H, L, dh_t, generator=g).to(device) for _ in range(2))
    key_mask = torch.ones(B, L, dtype=torch.bool, device=device)
    key_mask[B // 2:, L - L // 4:] = False  # padding in half the batch
    return q_s, k_s, q_t, k_t, key_mask


def run(device: torch.device, *, lengths=(128, 512), map_lengths=(128,), B: int = 32, H: int = 12, dh: int = 64,
        repeat: int = 3, compile_baseline: bool = False, progress: Progress | None = None) -> list[Result]:
    """``compile_baseline`` adds ``torch.compile`` of each eager loss (the attention and hidden cases)."""
    # One measure_all call: every timing runs before the first memory measurement, which switches
    # glibc to unmapping freed blocks for good (that makes later timings of allocation-heavy
    # implementations, such as the torch backend's per-chunk temporaries, pay page faults).
    entries = [e for L in lengths for e in _attention_entries(device, B, H, L, dh, compile_baseline=compile_baseline)]
    entries += [e for L in map_lengths for e in _map_mse_entries(device, B, H, L, dh)]
    entries += _hidden_entries(device, tokens=B * 128, compile_baseline=compile_baseline)
    return measure_all(entries, device, repeat=repeat, warmup=1, progress=progress)


def _backends(device: torch.device) -> list[str]:
    """The flash / epilogue backends timed on ``device`` (auto = Triton on CUDA)."""
    if device.type != "cpu":
        return ["auto"]
    return ["torch", "cpu"] if kdfast.backends()["cpu"].available else ["torch"]


def _grad_step(fn, *inputs):
    def go():
        leaves = [x.detach().requires_grad_() for x in inputs]
        fn(*leaves).backward()
        return [x.grad for x in leaves]
    return go


def _label(prefix: str, backend: str) -> str:
    return prefix if backend == "auto" else f"{prefix} {backend}"


def _attention_entries(device: torch.device, B: int, H: int, L: int, dh: int, *,
                       compile_baseline: bool = False) -> list[Entry]:
    q_s, k_s, q_t, k_t, key_mask = _inputs(B, H, L, dh, dh, device)
    entries = []
    for loss, eager in (("kl", eager_kl), ("mse", eager_mse)):
        case = f"{loss.upper()} B={B} H={H} L={L} dh={dh}"
        entries.append(Entry(SUITE, case, "eager",
                             _grad_step(lambda qs, ks, f=eager: f(qs, ks, q_t, k_t, key_mask), q_s, k_s)))
        if compile_baseline:
            compiled = torch.compile(eager, dynamic=False)
            entries.append(Entry(SUITE, case, "torch.compile", _grad_step(
                lambda qs, ks, f=compiled: f(qs, ks, q_t, k_t, key_mask), q_s, k_s)))
        if loss == "kl":
            entries.append(Entry(SUITE, case, "kdfast maps", _grad_step(lambda qs, ks: kdfast.attention_kl_loss(
                eager_scores(qs, ks, key_mask), eager_scores(q_t, k_t, key_mask).detach(), mask=key_mask), q_s, k_s)))
        for name in _backends(device):
            entries.append(Entry(SUITE, case, _label("kdfast flash", name), _grad_step(
                lambda qs, ks, b=name, lo=loss: kdfast.flash_attention_transfer(qs, ks, q_t, k_t, key_mask=key_mask,
                                                                               loss=lo, backend=b), q_s, k_s)))
    return entries


def _map_mse_entries(device: torch.device, B: int, H: int, L: int, dh: int) -> list[Entry]:
    q_s, k_s, q_t, k_t, key_mask = _inputs(B, H, L, dh, dh, device)
    s, t = eager_scores(q_s, k_s, key_mask), eager_scores(q_t, k_t, key_mask)
    case = f"map MSE B={B} H={H} L={L}"
    entries = [Entry(SUITE, case, "eager", _grad_step(lambda x: eager_map_mse(x, t, key_mask), s))]
    return entries + [Entry(SUITE, case, _label("kdfast maps", name), _grad_step(
        lambda x, b=name: kdfast.attention_mse_loss(x, t, key_mask, backend=b), s)) for name in _backends(device)]


def eager_hidden_mse(h_s, w, b, h_t):
    """TinyBERT's hidden loss as people write it: project, then mean squared error."""
    return F.mse_loss(F.linear(h_s, w, b), h_t)


def eager_cosine(x, h_t, ones):
    """DistilBERT's cosine loss as people write it."""
    return F.cosine_embedding_loss(x, h_t, ones)


def _hidden_entries(device: torch.device, *, tokens: int = 4096, d_s: int = 312, d_t: int = 768,
                    compile_baseline: bool = False) -> list[Entry]:
    g = torch.Generator(device="cpu").manual_seed(0)
    h_s = torch.randn(tokens, d_s, generator=g).to(device)
    h_t = torch.randn(tokens, d_t, generator=g).to(device)
    h_s2 = torch.randn(tokens, d_t, generator=g).to(device)
    w = (torch.randn(d_t, d_s, generator=g) / d_s**0.5).to(device)
    b = torch.zeros(d_t, device=device)
    ones = torch.ones(tokens, device=device)
    case = f"hidden MSE N={tokens} {d_s}->{d_t}"
    entries = [Entry(SUITE, case, "eager", _grad_step(lambda hs, ww, bb: eager_hidden_mse(hs, ww, bb, h_t), h_s, w, b))]
    if compile_baseline:
        compiled_mse = torch.compile(eager_hidden_mse, dynamic=False)
        entries.append(Entry(SUITE, case, "torch.compile",
                             _grad_step(lambda hs, ww, bb: compiled_mse(hs, ww, bb, h_t), h_s, w, b)))
    entries += [Entry(SUITE, case, _label("kdfast fused", name), _grad_step(
        lambda hs, ww, bb, n=name: kdfast.hidden_mse_loss(hs, h_t, ww, bb, backend=n), h_s, w, b))
        for name in _backends(device)]
    case = f"cosine N={tokens} d={d_t}"
    entries.append(Entry(SUITE, case, "eager", _grad_step(lambda x: eager_cosine(x, h_t, ones), h_s2)))
    if compile_baseline:
        compiled_cos = torch.compile(eager_cosine, dynamic=False)
        entries.append(Entry(SUITE, case, "torch.compile", _grad_step(lambda x: compiled_cos(x, h_t, ones), h_s2)))
    entries += [Entry(SUITE, case, _label("kdfast fused", name),
                      _grad_step(lambda x, n=name: kdfast.cosine_loss(x, h_t, backend=n), h_s2))
                for name in _backends(device)]
    return entries


def report(results: list[Result]) -> str:
    """The table against eager; on CPU also the C++ kernels against the torch backend of each case."""
    text = format_table(results)
    torch_impls = {r.impl for r in results if r.impl.endswith(" torch")}
    pairs = [(r, next((t for t in results if t.case == r.case and t.impl == r.impl[:-4] + " torch"), None))
             for r in results if r.impl.endswith(" cpu")]
    if torch_impls and pairs:
        text += "\n\nC++ kernel (backend='cpu') against the torch backend, same case and process:\n"
        text += (f"{'case':<28} {'impl':<22} {'torch ms':>9} {'cpu ms':>9} {'speed-up':>9} {'torch MB':>9} "
                 f"{'cpu MB':>9}\n")
        for cpu, ref in pairs:
            if ref is None or not cpu.ms or not ref.ms:
                continue
            mb = [f"{x.peak_bytes / 2**20:9.1f}" if x.peak_bytes is not None else f"{'-':>9}" for x in (ref, cpu)]
            text += (f"{cpu.case:<28} {cpu.impl[:-4]:<22} {ref.ms:9.2f} {cpu.ms:9.2f} {ref.ms / cpu.ms:8.2f}x "
                     f"{mb[0]} {mb[1]}\n")
    return text.rstrip("\n")


def run_suite(opts: BenchOptions) -> Table:
    """``kdfast bench --suites attention``: :func:`run` at its BERT-base shapes, as :func:`report` prints it."""
    results = run(opts.device, progress=opts.progress)
    return Table(results, report(results))
