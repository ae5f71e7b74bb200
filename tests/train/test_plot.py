"""loss.png (kdfast.train.plot): stages' logged terms from their metrics.jsonl on one step axis,
a one-line note instead of a figure without matplotlib; the recipes' held-out evaluation shows a
bar only with progress on."""

import json
import random
import sys

import torch

from kdfast.train.plot import loss_terms, plot_stage_losses, stage_curves


def write_metrics(directory, steps, terms, rng):
    """A stage's metrics.jsonl: training records with random positive terms, an evaluation record
    and a torn last line (as a killed run leaves)."""
    directory.mkdir(parents=True)
    records = [{"step": s, **{t: rng.uniform(0.1, 3.0) for t in terms}, "lr": 1e-3, "tokens_per_s": 10.0,
                "grad_norm": 1.5} for s in steps]
    lines = [json.dumps(r) for r in records]
    lines.insert(1, json.dumps({"step": steps[0], "eval/loss": 9.0}))
    (directory / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 9')
    return records


def test_stage_curves_put_the_stages_one_after_another(tmp_path):
    rng = random.Random(7)
    a = write_metrics(tmp_path / "a", [1, 3, 5], ["loss", "feature_map", "attention"], rng)
    b = write_metrics(tmp_path / "b", [1, 2, 4, 7], ["loss", "kd_mlm"], rng)
    curves = stage_curves([("pkt", tmp_path / "a"), ("pretrain", tmp_path / "b")])
    assert [(name, offset) for name, offset, _ in curves] == [("pkt", 0), ("pretrain", 5)]
    assert curves[0][2] == {t: [(r["step"], r[t]) for r in a] for t in ("loss", "feature_map", "attention")}
    assert curves[1][2] == {t: [(5 + r["step"], r[t]) for r in b] for t in ("loss", "kd_mlm")}
    assert loss_terms(a + b) == ["loss", "feature_map", "attention", "kd_mlm"]  # loss first, then log order


def test_plot_writes_a_png_and_only_a_note_without_matplotlib(tmp_path, monkeypatch, capsys):
    rng = random.Random(3)
    write_metrics(tmp_path / "a", [1, 2, 3], ["loss", "hidden"], rng)
    write_metrics(tmp_path / "b", [1, 2], ["loss", "kd_mlm"], rng)
    stages = [("one", tmp_path / "a"), ("two", tmp_path / "b")]
    path = plot_stage_losses(stages, tmp_path / "loss.png", title="t")
    assert path == tmp_path / "loss.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 1000
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # an import of it raises ImportError
    assert plot_stage_losses(stages, tmp_path / "none.png", title="t") is None
    err = capsys.readouterr().err.strip()
    assert err == f"{tmp_path / 'none.png'} not written: matplotlib is not installed (pip install matplotlib)"
    assert not (tmp_path / "none.png").exists()


def test_held_out_eval_shows_a_bar_only_with_progress(capsys):
    from kdfast.train.recipes.common import held_out_eval

    batches = [{"x": torch.randn(3)} for _ in range(4)]

    def step_loss(batch):
        return batch["x"].square().mean(), {"sq": batch["x"].square().mean()}

    expected = sum(float(b["x"].square().mean()) for b in batches) / 4
    for progress in (False, True):
        result = held_out_eval(step_loss, lambda: iter(batches), torch.device("cpu"), seed=0,
                               progress=progress)(None)
        assert abs(result["loss"] - expected) < 1e-6 and abs(result["sq"] - expected) < 1e-6
        err = capsys.readouterr().err
        assert ("held-out eval" in err) == progress, err
