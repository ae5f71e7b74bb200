"""Logit-distillation loss, forward + backward: kdfast backends against eager PyTorch,
``torch.compile``'d eager, Liger-Kernel's JSD with beta=0 (forward KL) on a GPU, and TextBrewer's
``kd_ce_loss`` (soft cross-entropy, the KL's gradient) wherever those import."""

from __future__ import annotations

import importlib
import importlib.util

import torch
import torch.nn.functional as F

import kdfast
from kdfast.bench import BenchOptions, Progress, Table
from kdfast.bench.timing import Entry, Result, copy_bandwidth_gbs, format_table, measure_all

SUITE = "kd_loss"


def eager_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """What people write: two log_softmax, kl_div(batchmean) * T^2."""
    return F.kl_div(F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1),
                    reduction="batchmean", log_target=True) * temperature**2


def liger_kd(temperature: float):
    """Liger-Kernel's JSD with beta=0 (forward KL(p_t || p_s)), on temperature-scaled log-probabilities."""
    from liger_kernel.transformers import LigerJSD

    jsd = LigerJSD(beta=0.0)
    return lambda x, y: jsd(F.log_softmax(x / temperature, -1), F.log_softmax(y / temperature, -1)) * temperature**2


def textbrewer_kd(temperature: float):
    """TextBrewer's ``kd_ce_loss`` (cross-entropy to the teacher's soft targets) times T^2."""
    from textbrewer.losses import kd_ce_loss

    return lambda x, y: kd_ce_loss(x, y, temperature) * temperature**2


def _importable(module: str) -> str:
    """'' when ``module`` imports here, else why not (one line)."""
    try:
        importlib.import_module(module)
        return ""
    except Exception as e:  # missing, or broken against this torch (e.g. TextBrewer without tensorboard)
        return f"{module} not importable ({type(e).__name__}: {str(e)[:60]})"


def _fwd_bwd(loss_fn, s, t, producer=False):
    """One training step of the loss: forward + backward, returning the student-logit gradient.

    With ``producer``, the logits come out of an op (as from the LM head), so in-place mode can
    reuse their buffer; the op is a multiply by one, which does not save its output.
    """
    def step():
        leaf = s.detach().requires_grad_()
        loss_fn(leaf * 1.0 if producer else leaf, t).backward()
        return leaf.grad
    return step


def entries(device: torch.device, N: int, V: int, dtype: torch.dtype, temperature: float = 2.0,
            compile_baseline: bool = True) -> tuple[list[Entry], list[Result]]:
    s = (torch.randn(N, V, device=device) * 3).to(dtype)
    t = (torch.randn(N, V, device=device) * 3).to(dtype)
    T = temperature
    case = f"N={N} V={V} {str(dtype).replace('torch.', '')}"
    out = [Entry(SUITE, case, "eager", _fwd_bwd(lambda x, y: eager_kd(x, y, T), s, t))]
    notes: list[Result] = []
    if compile_baseline:
        compiled = torch.compile(lambda x, y: eager_kd(x, y, T), dynamic=False)
        out.append(Entry(SUITE, case, "torch.compile", _fwd_bwd(compiled, s, t)))
    if device.type == "cuda":
        why = _importable("liger_kernel.transformers")
        if why:
            notes.append(Result(SUITE, case, "liger JSD(beta=0)", None, None, note=why))
        else:
            out.append(Entry(SUITE, case, "liger JSD(beta=0)", _fwd_bwd(liger_kd(T), s, t)))
    why = _importable("textbrewer.losses") if importlib.util.find_spec("textbrewer") else "textbrewer not installed"
    if why:
        notes.append(Result(SUITE, case, "textbrewer kd_ce_loss", None, None, note=why))
    else:
        out.append(Entry(SUITE, case, "textbrewer kd_ce_loss", _fwd_bwd(textbrewer_kd(T), s, t)))
    status = kdfast.backends()
    ours = [b for b in ("triton", "cuda") if device.type == "cuda" and status[b].available]
    ours += ["cpu"] if device.type == "cpu" and status["cpu"].available else []
    moved = 3 * N * V * s.element_size()  # read student + teacher, write the gradient
    for b in ours:
        out.append(Entry(SUITE, case, f"kdfast-{b}", _fwd_bwd(
            lambda x, y, b=b: kdfast.kd_loss(x, y, temperature=T, backend=b), s, t), bytes_moved=moved))
    if ours:
        b = ours[0]
        pcase = case + " +producer"
        out += [
            Entry(SUITE, pcase, "eager", _fwd_bwd(lambda x, y: eager_kd(x, y, T), s, t, producer=True)),
            Entry(SUITE, pcase, f"kdfast-{b}", _fwd_bwd(
                lambda x, y: kdfast.kd_loss(x, y, temperature=T, backend=b), s, t, producer=True)),
            Entry(SUITE, pcase, f"kdfast-{b} inplace", _fwd_bwd(
                lambda x, y: kdfast.kd_loss(x, y, temperature=T, backend=b, inplace=True), s, t, producer=True)),
        ]
    return out, notes


def default_sizes(device: torch.device, quick: bool) -> list[tuple[int, int]]:
    """(rows, vocab) cases of ``kdfast bench``: one with ``quick``, the larger of two otherwise."""
    if device.type == "cuda":
        return [(16384, 30522)] if quick else [(4096, 30522), (16384, 30522)]
    return [(1024, 30522)] if quick else [(256, 30522), (1024, 30522)]


def run(device: torch.device, sizes: list[tuple[int, int]], dtypes: list[torch.dtype], *, temperature: float = 2.0,
        repeat: int = 5, compile_baseline: bool = True, progress: Progress | None = None) -> list[Result]:
    copy_bw = copy_bandwidth_gbs(device) if device.type == "cuda" else None
    results: list[Result] = []
    for N, V in sizes:
        for dtype in dtypes:
            ents, notes = entries(device, N, V, dtype, temperature, compile_baseline)
            results += measure_all(ents, device, repeat=repeat, copy_bw_gbs=copy_bw, progress=progress) + notes
            del ents
    if copy_bw:
        results.append(Result(SUITE, "device", "copy bandwidth", None, None, note=f"{copy_bw:.0f} GB/s"))
    return results


def run_suite(opts: BenchOptions) -> Table:
    """``kdfast bench --suites kd_loss``: every size of ``opts.sizes`` (default :func:`default_sizes`) and dtype."""
    sizes = list(opts.sizes) if opts.sizes else default_sizes(opts.device, opts.quick)
    results = run(opts.device, sizes, list(opts.dtypes), repeat=opts.repeat, compile_baseline=opts.compile_baseline,
                  progress=opts.progress)
    return Table(results, format_table(results))
