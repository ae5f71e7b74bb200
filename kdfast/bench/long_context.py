"""Long-context attention transfer: one layer at L = 1,024 to 8,192, global and local (sliding window).

For each length L (B = 1, 12 heads, d_head = 64, float32 by default), each layer kind (``global``,
and ``local`` with the band |i - j| <= 64, ModernBERT's ``local_attention=128``) and each loss (KL,
MSE), forward + backward of the student's Q and K with the teacher frozen:

- ``eager``: the materialised loss as people write it: scores = q k^T / sqrt(d_head) (plus
  finfo.min outside the band of a local layer, as ModernBERT's eager attention masks it), then
  log-softmax + KL per query row, or the squared error over the band;
- ``textbrewer``: TextBrewer's attention losses on the same materialised scores (``att_ce_loss``,
  whose gradient is the KL's, and ``att_mse_loss``), when ``textbrewer`` is importable ("not
  installed" otherwise);
- ``kdfast flash``: :func:`kdfast.flash_attention_transfer` from Q and K (``window=64`` for the
  local layer), on the device's backend (the C++ kernel on CPU, Triton on CUDA): no L x L map.

A map-based peer needs several [B, H, L, L] maps at once. Its bytes at L are estimated *before*
anything is allocated, from its peak measured at the smallest length scaled by (L / L_0)^2; above
the memory cap (``cap_bytes``, 8 GiB by default) its row says "out of memory (estimated X GiB >
cap)" and it is not run. Implementations of one case are timed in alternation (one call each per
round, after one warm-up call each); the table gives the best and the median time, the ratios of
the eager median to each median (and best to best), and each one's peak extra memory (above what
was allocated before the call; the inputs are not counted) with the ratio eager / kdfast. A second
table compares each implementation's local layer with its global layer at the same length.
"""

from __future__ import annotations

import math
import statistics
import time

import torch
import torch.nn.functional as F

import kdfast
from kdfast.bench import BenchOptions, Progress, Table, no_progress
from kdfast.bench.timing import Result, by_case, peak_memory_bytes

SUITE = "long_context"
LENGTHS = (1024, 2048, 4096, 8192)
WINDOW = 64
CAP_BYTES = 8 << 30
LOSSES = ("kl", "mse")


def band_scores(q, k, window: int | None):
    """Materialised scores q k^T / sqrt(d_head), finfo.min outside the band |i - j| <= window."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if window is None:
        return s
    L = s.shape[-1]
    pos = torch.arange(L, device=s.device)
    band = (pos[:, None] - pos[None, :]).abs() <= window
    return s.masked_fill(~band, torch.finfo(s.dtype).min)


def eager_loss(loss: str, window: int | None):
    """The materialised loss of one layer (q_s, k_s, q_t, k_t) -> scalar, mean over query rows (KL)
    or over the pairs of the band (MSE)."""

    def kl(q_s, k_s, q_t, k_t):
        log_s = F.log_softmax(band_scores(q_s, k_s, window), -1)
        with torch.no_grad():
            log_t = F.log_softmax(band_scores(q_t, k_t, window), -1)
        return (log_t.exp() * (log_t - log_s)).sum(-1).mean()

    def mse(q_s, k_s, q_t, k_t):
        s = band_scores(q_s, k_s, None)
        with torch.no_grad():
            t = band_scores(q_t, k_t, None)
        if window is None:
            return F.mse_loss(s, t)
        L = s.shape[-1]
        pos = torch.arange(L, device=s.device)
        band = (pos[:, None] - pos[None, :]).abs() <= window
        diff = torch.where(band, s - t, 0.0)
        return (diff * diff).sum() / (band.sum() * s.shape[0] * s.shape[1])

    return kl if loss == "kl" else mse


def textbrewer_loss(loss: str, window: int | None):
    """TextBrewer's attention loss on the materialised scores (band-masked for a local layer)."""
    from textbrewer.losses import att_ce_loss, att_mse_loss

    fn = att_ce_loss if loss == "kl" else att_mse_loss

    def run(q_s, k_s, q_t, k_t):
        with torch.no_grad():
            t = band_scores(q_t, k_t, window)
        mask = torch.ones(q_s.shape[0], q_s.shape[2], device=q_s.device)
        return fn(band_scores(q_s, k_s, window), t, mask)

    return run


def kdfast_loss(loss: str, window: int | None):
    def run(q_s, k_s, q_t, k_t):
        return kdfast.flash_attention_transfer(q_s, k_s, q_t, k_t, loss=loss, window=window)

    return run


def _step(fn, q_s, k_s, q_t, k_t):
    """Forward + backward with fresh leaves: returns the gradients."""

    def go():
        qs, ks = q_s.detach().requires_grad_(), k_s.detach().requires_grad_()
        fn(qs, ks, q_t, k_t).backward()
        return qs.grad, ks.grad

    return go


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_alternating(fns: dict[str, object], device: torch.device, repeat: int,
                     peaks: dict[str, int | None] | None = None) -> dict[str, list[float]]:
    """Milliseconds of each call, the implementations alternating round by round after one warm-up
    call each; with ``peaks``, the warm-up call is the one whose peak extra memory is measured
    (:func:`kdfast.bench.timing.peak_memory_bytes`), so a slow peer runs once less."""
    for name, fn in fns.items():
        if peaks is None:
            fn()
        else:
            peaks[name] = peak_memory_bytes(fn, device)
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def _inputs(B: int, H: int, L: int, dh: int, dtype: torch.dtype, device: torch.device):
    g = torch.Generator(device="cpu").manual_seed(L)
    q_t, k_t = (torch.randn(B, H, L, dh, generator=g) for _ in range(2))
    # a student that resembles its teacher (the KL rows are then of the size training sees)
    q_s = q_t + 0.5 * torch.randn(B, H, L, dh, generator=g)
    k_s = k_t + 0.5 * torch.randn(B, H, L, dh, generator=g)
    return tuple(x.to(device=device, dtype=dtype) for x in (q_s, k_s, q_t, k_t))


def _textbrewer_available() -> bool:
    try:
        import textbrewer.losses  # noqa: F401
    except ImportError:
        return False
    return True


def run(device: torch.device, *, lengths=LENGTHS, window: int = WINDOW, B: int = 1, H: int = 12, dh: int = 64,
        dtype: torch.dtype = torch.float32, repeat: int = 3, cap_bytes: int = CAP_BYTES, losses=LOSSES,
        peers: bool = True, progress: Progress = no_progress) -> list[Result]:
    """Every (L, layer, loss) case; Result.extra holds best_ms, median_ms and the estimate of a
    map-based peer's bytes; ``note`` says "out of memory ..." or "not installed" where it did not run.
    ``peers=False`` times kdfast alone (its local layer against its global one)."""
    results: list[Result] = []
    brewer = peers and _textbrewer_available()
    per_map: dict[str, float] = {}  # peer -> measured peak / map bytes at the first length
    for L in sorted(lengths):
        q_s, k_s, q_t, k_t = _inputs(B, H, L, dh, dtype, device)
        map_bytes = B * H * L * L * torch.finfo(dtype).bits // 8
        for layer, w in (("global", None), (f"local w={window}", window)):
            for loss in losses:
                case = f"{loss.upper()} L={L} {layer}"
                maps = {"eager": eager_loss(loss, w)} if peers else {}
                if brewer:
                    maps["textbrewer"] = textbrewer_loss(loss, w)
                impls = {**maps, "kdfast flash": kdfast_loss(loss, w)}
                rows = {name: Result(SUITE, case, name, None, None) for name in impls}
                if peers and not brewer:
                    results.append(Result(SUITE, case, "textbrewer", None, None, note="not installed"))
                runnable = {}
                for name, fn in impls.items():
                    key = f"{name} {loss} {'global' if w is None else 'local'}"
                    if name in maps and key in per_map:
                        estimate = per_map[key] * map_bytes
                        rows[name].extra["estimate_bytes"] = int(estimate)
                        if estimate > cap_bytes:
                            rows[name].note = (f"out of memory: needs about {_size(estimate)} of "
                                               f"[B, H, L, L] maps, over the {_size(cap_bytes)} cap")
                            progress(f"{SUITE}: {case}: {name}: {rows[name].note}")
                            continue
                    runnable[name] = _step(fn, q_s, k_s, q_t, k_t)
                progress(f"{SUITE}: {case}: timing {', '.join(runnable)}")
                peaks: dict[str, int | None] = {}
                times = time_alternating(runnable, device, repeat, peaks)
                for name in runnable:
                    r = rows[name]
                    r.ms = statistics.median(times[name])
                    r.extra.update(best_ms=min(times[name]), median_ms=r.ms)
                    r.peak_bytes = peaks[name]
                    progress(f"{SUITE}: {case}: {name}: best {min(times[name]):.1f} ms, median {r.ms:.1f} ms, "
                             f"peak {(r.peak_bytes or 0) / 2**20:.1f} MiB")
                    key = f"{name} {loss} {'global' if w is None else 'local'}"
                    if name in maps and key not in per_map and r.peak_bytes:
                        per_map[key] = r.peak_bytes / map_bytes
                results.extend(rows.values())
        del q_s, k_s, q_t, k_t
    return results


def _size(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.0f} MiB"


def _fmt_ms(x: float | None) -> str:
    return f"{x:10.1f}" if x is not None else f"{'-':>10}"


def report(results: list[Result], *, cap_bytes: int = CAP_BYTES) -> str:
    """The speed / memory table against eager, then local against global per implementation."""
    head = (f"{'case':<24} {'impl':<13} {'best ms':>10} {'median ms':>10} {'x eager':>8} {'(best)':>8} "
            f"{'peak MiB':>9} {'mem x':>8}  note")
    lines = [head, "-" * len(head)]
    cases = by_case(results)
    for case, rows in cases.items():
        base = next((r for r in rows if r.impl == "eager"), None)
        for r in rows:
            best = r.extra.get("best_ms")
            ratio = f"{base.ms / r.ms:7.1f}x" if base and base.ms and r.ms else f"{'-':>8}"
            best_ratio = (f"{base.extra['best_ms'] / best:7.1f}x" if base and base.ms and best else f"{'-':>8}")
            mib = f"{r.peak_bytes / 2**20:9.1f}" if r.peak_bytes is not None else f"{'-':>9}"
            mem = (f"{base.peak_bytes / max(r.peak_bytes, 1):7.0f}x"
                   if base and base.peak_bytes and r.peak_bytes is not None else f"{'-':>8}")
            lines.append(f"{case:<24} {r.impl:<13} {_fmt_ms(best)} {_fmt_ms(r.ms)} {ratio} {best_ratio} {mib} {mem}  "
                         f"{r.note}")
    lines += ["", f"local (w={WINDOW}) against global, same implementation, L and loss (median times):",
              f"{'L':>6} {'loss':<5} {'impl':<13} {'global ms':>10} {'local ms':>10} {'speed-up':>9}"]
    for r in results:
        if "global" not in r.case or not r.ms:
            continue
        local = next((x for x in results if x.impl == r.impl and x.ms
                      and x.case == r.case.replace("global", f"local w={WINDOW}")), None)
        if local is None:
            continue
        loss, length = r.case.split()[:2]
        lines.append(f"{length[2:]:>6} {loss:<5} {r.impl:<13} {r.ms:10.1f} {local.ms:10.1f} {r.ms / local.ms:8.1f}x")
    lines += ["", f"memory cap for the map-based peers: {_size(cap_bytes)} (estimated before allocating: "
                  "peak at the smallest length x (L / L_0)^2); peak = extra memory above the inputs"]
    return "\n".join(lines)


def run_suite(opts: BenchOptions) -> Table:
    """``kdfast bench --suites long_context``: :func:`run` at L = 1,024 .. 8,192 (``--quick``: 256 and
    512, with the cap scaled down so the out-of-memory path runs too)."""
    if opts.quick:
        results = run(opts.device, lengths=(256, 512), H=2, repeat=2, cap_bytes=4 << 20, progress=opts.progress)
        return Table(results, report(results, cap_bytes=4 << 20))
    results = run(opts.device, repeat=opts.repeat, progress=opts.progress)
    return Table(results, report(results))


def entries(device: torch.device, lengths=(4096, 8192), *, window: int = WINDOW, B: int = 1, H: int = 12,
            dh: int = 64, dtype: torch.dtype = torch.float32, suite: str = "attention") -> list:
    """The rows ``make gpu-check`` measures (:class:`kdfast.bench.timing.Entry`): eager against
    kdfast flash, KL and MSE, one global and one local layer at each length (no memory cap: a GPU
    holds eager's maps at these lengths)."""
    from kdfast.bench.timing import Entry

    out = []
    for L in lengths:
        q_s, k_s, q_t, k_t = _inputs(B, H, L, dh, dtype, device)
        for layer, w in (("global", None), (f"local w={window}", window)):
            for loss in LOSSES:
                case = f"{loss.upper()} B={B} H={H} L={L} {layer}"
                out += [Entry(suite, case, "eager", _step(eager_loss(loss, w), q_s, k_s, q_t, k_t)),
                        Entry(suite, case, "kdfast flash", _step(kdfast_loss(loss, w), q_s, k_s, q_t, k_t))]
    return out
