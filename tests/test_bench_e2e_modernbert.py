"""``kdfast bench --suites e2e_modernbert`` at tiny shapes: the TinyBERT step from a ModernBERT
teacher, kdfast's (attention from Q/K, windowed on local layers) and the hand-written one on
``output_attentions`` score maps, compute the same loss terms and gradients (float64, on a
configuration the bench does not use); both rows of the bench run and agree at step 0; a
hand-written step over the memory cap is printed as out of memory. Nothing here is timed."""

import copy
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import ModernBertConfig, ModernBertModel

from kdfast import DistillationLoss
from kdfast.bench import e2e_baselines as hand
from kdfast.bench import e2e_modernbert as mb
from kdfast.bench.timing import cpu_peak_memory_supported
from kdfast.models import uniform_layer_map
from kdfast.models.modernbert import attention_windows
from kdfast.models.students import tinybert_student
from kdfast.train.teacher import QK_PRESCALED, capture_outputs
from tests.helpers import F64, assert_close
from tests.reference import attention_mse_reference

ROOT = Path(__file__).resolve().parents[1]
PROGRESS: list[str] = []


def _rotary_in_dtype(q, k, cos, sin, unsqueeze_dim=1):
    """transformers' ModernBERT rotary embedding without its round trip through fp32."""
    from transformers.models.modernbert.modeling_modernbert import rotate_half

    cos, sin = cos.unsqueeze(unsqueeze_dim).to(q.dtype), sin.unsqueeze(unsqueeze_dim).to(q.dtype)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


@pytest.fixture
def pair(monkeypatch):
    """A float64 ModernBERT teacher (6 layers, 5 heads x 6, windows |i - j| <= 3, a global layer every
    third) and kdfast's TinyBERT-style student of it (3 layers, 5 heads x 4: local, global, local),
    with a full row of 23 tokens (the bench's batches are full rows). transformers rotates Q and K in
    fp32 and casts back, which rounds their float64 gradients to fp32 ulps: the rotary function
    (the model's and the capture's alike) keeps float64 here."""
    from transformers.models.modernbert import modeling_modernbert

    monkeypatch.setattr(modeling_modernbert, "apply_rotary_pos_emb", _rotary_in_dtype)
    torch.manual_seed(0)
    tconf = ModernBertConfig(vocab_size=53, hidden_size=30, num_hidden_layers=6, num_attention_heads=5,
                             intermediate_size=19, local_attention=7, global_attn_every_n_layers=3,
                             max_position_embeddings=64, initializer_range=0.3, pad_token_id=0, bos_token_id=1,
                             eos_token_id=2, cls_token_id=1, sep_token_id=2)
    teacher = ModernBertModel(tconf).double().eval().requires_grad_(False)
    student = tinybert_student(tconf, "tinybert-4", num_hidden_layers=3, hidden_size=20, intermediate_size=13,
                               num_attention_heads=5, initializer_range=0.3).model.double().eval()
    ids = torch.randint(3, 53, (1, 23))
    return teacher, student, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_kdfast_terms_and_gradients_equal_the_maps_based_step(pair):
    teacher, student, batch = pair
    layer_map = uniform_layer_map(6, 3)
    t_win, s_win = attention_windows(teacher.config), attention_windows(student.config)
    windows = [s_win[m - 1] for m in layer_map if m >= 1]
    assert windows == [3, None, 3] and [t_win[g - 1] for m, g in layer_map.items() if m >= 1] == windows
    # kdfast's criterion as the tinybert recipe builds it: attention from the captured (rotated) Q/K
    crit = DistillationLoss(layer_map, {"hidden": 1.0, "attention": 1.0}, student_hidden_size=20,
                            teacher_hidden_size=30, attention="mse", attention_source="qk",
                            qk_prescaled=QK_PRESCALED, teacher_windows=t_win, student_windows=s_win).double()
    # the hand-written step's models, copied before any gradient: eager, output_attentions=True, the
    # maps being the scores
    hs, ht = hand.ScoresModernBert(copy.deepcopy(student)), hand.ScoresModernBert(copy.deepcopy(teacher))
    projs = copy.deepcopy(crit.projections)
    with torch.no_grad():
        t_out = capture_outputs(teacher, batch, qk=True)
    total, terms = crit(capture_outputs(student, batch, qk=True), t_out, batch["attention_mask"])
    total.backward()
    kd_grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    kd_grads.update({f"proj.{n}": p.grad.clone() for n, p in crit.projections.named_parameters()})

    def term(alpha_hidden, alpha_attention, mean_over="kept"):
        cfg = SimpleNamespace(alpha_hidden=alpha_hidden, alpha_attention=alpha_attention)
        return hand.tinybert_loss(hs, ht, projs, layer_map, batch, cfg, mean_over=mean_over)()

    with torch.no_grad():
        assert_close(term(1.0, 0.0), terms["hidden"], torch.float64, "hidden term", F64)
        assert_close(term(0.0, 1.0), terms["attention"], torch.float64, "attention term", F64)
        # the maps themselves: the float64 oracle of the windowed score MSE on each pair's band
        s_maps = hs(**batch)["scores"]
        t_maps = ht(**batch)["scores"]
        oracle = sum(attention_mse_reference(s_maps[m - 1], t_maps[g - 1], window=w)
                     for (m, g), w in zip([(m, g) for m, g in layer_map.items() if m >= 1], windows))
        assert_close(terms["attention"], oracle, torch.float64, "attention vs oracle", F64)
        # the mean over every entry (TinyBERT's MSELoss as written) is another objective on local layers
        assert abs(float(term(0.0, 1.0, "all")) - float(terms["attention"])) > 1e-3 * float(terms["attention"])
    term(1.0, 1.0).backward()
    hand_grads = {n: p.grad for n, p in hs.model.named_parameters() if p.grad is not None}
    hand_grads.update({f"proj.{n}": p.grad for n, p in projs.named_parameters()})
    assert hand_grads.keys() == kd_grads.keys()
    for name, g in kd_grads.items():
        assert_close(g, hand_grads[name], torch.float64, f"gradient of {name}", F64)


def test_attention_mse_mean_over_is_checked():
    with pytest.raises(ValueError, match="mean_over"):
        hand.tinybert_attention_mse(torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2), "band")


@pytest.fixture(scope="module")
def results():
    return mb.run(torch.device("cpu"), shape="tiny", repeat=2, progress=PROGRESS.append)


def test_both_steps_ran_and_agree_at_step_0(results):
    rows = {r.impl: r for r in results}
    assert set(rows) == {mb.KDFAST, mb.HANDWRITTEN}
    for r in rows.values():
        assert r.case == "tinybert 1x48 ModernBERT 6x48" and r.note == "", (r.impl, r.note)
        assert 0 < r.extra["best_ms"] <= r.extra["median_ms"] == r.ms, r.impl
        if cpu_peak_memory_supported():
            assert r.peak_bytes is not None, r.impl
        assert r.extra["loss0"] > 0
        # the student follows the teacher's layer types: local, global, local pairs
        assert r.extra["windows"] == {1: 4, 2: None, 3: 4} and r.extra["layer_map"] == {0: 0, 1: 2, 2: 4, 3: 6}
    assert rows[mb.KDFAST].extra["loss_match"].startswith("yes"), rows[mb.KDFAST].extra["loss_match"]
    assert rows[mb.KDFAST].extra["loss0"] == pytest.approx(rows[mb.HANDWRITTEN].extra["loss0"], rel=1e-4)
    assert rows[mb.HANDWRITTEN].extra["loss_match"] == "reference"
    assert rows[mb.HANDWRITTEN].extra["estimate_bytes"] == 1 * 48 * 48 * 4 * (6 * 12 + 4 * 3 * 12)
    table = mb.report(results)
    for impl in rows:
        assert impl in table
    assert "out of memory" not in table and "NO (" not in table and "LGL" in table and "1:2 w=4" in table
    assert any(line.startswith("e2e_modernbert: tinybert 1x48") and "measured in" in line for line in PROGRESS)


def test_over_the_cap_the_hand_written_step_is_out_of_memory():
    lines: list[str] = []
    res = mb.run(torch.device("cpu"), shape="tiny", repeat=1, memory=False, cap_bytes=1 << 20, progress=lines.append)
    rows = {r.impl: r for r in res}
    oom = rows[mb.HANDWRITTEN]
    assert oom.ms is None and oom.peak_bytes is None and oom.extra["loss0"] is None
    assert oom.note.startswith("out of memory: needs at least 2 MiB of [B, H, L, L] maps, over the 1 MiB cap"), \
        oom.note
    assert oom.extra["estimate_bytes"] > 1 << 20
    assert rows[mb.KDFAST].ms > 0 and rows[mb.KDFAST].note == ""
    assert rows[mb.KDFAST].extra["loss_match"] == "-"  # nothing to compare with
    assert "out of memory" in mb.report(res)
    assert any("hand-written: not run: out of memory" in line for line in lines), lines


def test_bad_arguments_are_one_line_errors():
    for kwargs, match in (({"shape": "base"}, "shape"), ({"lengths": (0,)}, "lengths"), ({"batch": 0}, "batch"),
                          ({"dtype": torch.float16}, "dtype"), ({"repeat": 0}, "repeat")):
        with pytest.raises(ValueError, match=match):
            mb.run(torch.device("cpu"), **kwargs)
    p = subprocess.run([sys.executable, "-m", "kdfast.cli", "bench", "--suites", "e2e_modernbert", "--dtype", "fp16"],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "--dtype" in p.stderr and "e2e_modernbert" in p.stderr and "kdfast bench on" not in p.stdout


def test_the_bench_command_runs_the_suite(capsys):
    """``kdfast bench --suites e2e_modernbert`` for real, at the quick shape and a short length."""
    from kdfast.cli import main

    assert main(["bench", "--suites", "e2e_modernbert", "--quick", "--tokens", "1x64", "--repeat", "1",
                 "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    rows = [line for line in captured.out.splitlines() if line.startswith("tinybert 1x64 ModernBERT 3x192")]
    assert [mb.KDFAST in rows[0], mb.HANDWRITTEN in rows[1]] == [True, True], captured.out
    assert " yes (" in rows[0] and "reference" in rows[1] and "out of memory" not in captured.out, captured.out
    assert "e2e_modernbert: tinybert 1x64" in captured.err
