"""``loss.png``: the loss curves of a run (the demo) or of a recipe's stages, from their ``metrics.jsonl``.

matplotlib is optional: without it nothing is written and one line on stderr says so.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

#: logged keys that are not loss terms
NOT_TERMS = frozenset({"step", "lr", "tokens_per_s", "grad_norm"})


def loss_terms(records: Sequence[dict]) -> list[str]:
    """The loss terms of logged records: ``loss`` first, then every other numeric key in log order
    (not ``step``, ``lr``, ``tokens_per_s``, ``grad_norm``, nor evaluation keys)."""
    keys = {k: None for r in records for k, v in r.items()
            if k not in NOT_TERMS and not k.startswith("eval/") and isinstance(v, (int, float))}
    return sorted(keys, key=lambda k: k != "loss")


def stage_curves(stages: Sequence[tuple[str, str | os.PathLike]]) -> list[tuple[str, int, dict[str, list]]]:
    """``(stage name, first step of the stage on the common axis, {term: [(step, value), ...]})`` per
    ``(stage name, stage output directory)``: each stage's training records of ``metrics.jsonl``,
    its steps shifted by the last logged steps of the stages before it."""
    from kdfast.train.distiller import read_metrics

    records = [(name, read_metrics(Path(directory) / "metrics.jsonl")[0]) for name, directory in stages]
    terms = loss_terms([r for _, rs in records for r in rs])
    curves, offset = [], 0
    for name, rs in records:
        points = {term: [(offset + r["step"], r[term]) for r in rs if term in r] for term in terms}
        curves.append((name, offset, {term: p for term, p in points.items() if p}))
        offset += max((r["step"] for r in rs), default=0)
    return curves


def plot_stage_losses(stages: Sequence[tuple[str, str | os.PathLike]], path: str | os.PathLike, *,
                      title: str) -> Path | None:
    """Draw the logged loss terms of each ``(stage name, stage output directory)`` (read from its
    ``metrics.jsonl``, so a resumed run's curve is whole) one stage after the other on one step
    axis, stage boundaries dashed and named, on a log scale when every value is > 0; write the
    figure to ``path``. Returns ``path``, or None (and prints one line to stderr) when
    matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        print(f"{path} not written: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = stage_curves(stages)
    colours: dict[str, str] = {}
    fig, ax = plt.subplots(figsize=(7, 4))
    positive = True
    for i, (name, offset, points) in enumerate(curves):
        if len(curves) > 1:
            if i:
                ax.axvline(offset, color="0.7", linestyle="--", linewidth=0.8)
            ax.annotate(name, (offset, 1.0), xycoords=("data", "axes fraction"), fontsize=7, rotation=90,
                        va="top", ha="left")
        for term, xy in points.items():
            positive = positive and all(v > 0 for _, v in xy)
            first = term not in colours
            colours.setdefault(term, f"C{len(colours) % 10}")
            ax.plot(*zip(*xy), color=colours[term], label=term if first else None)
    drawn = bool(colours)
    ax.set_xlabel("step" if len(curves) == 1 else "step (stages one after another)")
    if positive and drawn:
        ax.set_yscale("log")
    ax.set_title(title)
    if drawn:
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
