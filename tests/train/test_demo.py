"""The embedded demo end to end on a small slice (the full run is `make demo`)."""

import json

import pytest

from kdfast.defaults import minilm_teacher_dir, pydoc_paragraphs


def test_demo_small_run(tmp_path):
    try:
        minilm_teacher_dir()
    except FileNotFoundError as e:
        pytest.fail(f"the default teacher must be installed by the set-up: {e}")
    from transformers import AutoModel, AutoTokenizer

    from kdfast.models import count
    from kdfast.train.demo import format_report, mean_pooled, retrieval_accuracy, run_demo

    report = run_demo(str(tmp_path / "demo"), steps=3, batch_size=8, max_length=32, max_paragraphs=60,
                      progress=False)
    t, s, c = report["teacher"], report["student"], report["compressed"]
    assert s["layers"] == 3 and c["layers"] == 2 and t["layers"] == 6
    for m in (t, s, c):  # embedding and body apart, FLOPs, latency, retrieval, cosine
        assert m["params"] == m["params_embeddings"] + m["params_body"] > 0
        assert m["flops_per_token"] > 0 and 0 < m["latency_ms_b1"]["best"] <= m["latency_ms_b1"]["median"]
        assert 0 <= m["retrieval_accuracy"] <= 1 and -1 <= m["embedding_cosine_to_teacher"] <= 1 + 1e-6
    assert t["params"] == count(AutoModel.from_pretrained(minilm_teacher_dir()))["params"]
    # the size ratio: the plain student keeps the whole embedding, the compressed one does not
    assert s["params_embeddings"] > 0.99 * t["params_embeddings"] and s["params"] < t["params"]
    assert 3 * c["params"] <= t["params"] and c["smaller"] == pytest.approx(t["params"] / c["params"])
    assert c["params_body"] < s["params_body"] < t["params_body"] and c["flops_per_token"] < s["flops_per_token"]
    v = c["vocabulary"]
    assert c["vocab_size"] == v["kept_tokens"] < v["teacher_tokens"] == t["vocab_size"]
    assert 0.5 < v["held_out_coverage"] < 1  # the held-out text has tokens the training text lacks
    for m in (s, c):
        assert m["retention"] == pytest.approx(m["retrieval_accuracy"] / t["retrieval_accuracy"])
        assert m["faster"]["median"] == pytest.approx(t["latency_ms_b1"]["median"] / m["latency_ms_b1"]["median"])
    assert {name: lo["last"]["step"] for name, lo in report["loss"].items()} == {"distil": 3, "compress": 3}

    table = format_report(report)
    for text in ("#params (emb + body)", "FLOPs/tok", "ms b=1 best/med", "faster", "retrieval", "retained",
                 "cosine", "all-MiniLM-L6-v2 (6 layers)", "student (3 layers)", "compressed (2 layers", "cover",
                 "loss distil", "loss compress"):
        assert text in table, text
    assert f"{c['smaller']:.2f}x" in table and f"{100 * c['retention']:.1f}%" in table

    out = tmp_path / "demo"
    assert json.loads((out / "report.json").read_text())["config"]["steps"] == 3
    assert (out / "loss.png").stat().st_size > 1000
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    assert len((out / "compress" / "metrics.jsonl").read_text().splitlines()) == 3
    # both students reload with the standard classes and encode as the report says (the teacher's pooling)
    held_out = pydoc_paragraphs()[:60][::5]
    teacher_dir = minilm_teacher_dir()
    teacher_emb = mean_pooled(AutoModel.from_pretrained(teacher_dir), AutoTokenizer.from_pretrained(teacher_dir),
                              held_out)
    for name, m in (("student", s), ("compressed", c)):
        model, tok = AutoModel.from_pretrained(out / name), AutoTokenizer.from_pretrained(out / name)
        assert model.config.vocab_size == len(tok) == m["vocab_size"]
        assert count(model)["params_embeddings"] == m["params_embeddings"]
        cos = float((mean_pooled(model, tok, held_out) * teacher_emb).sum(-1).mean())
        assert cos == pytest.approx(m["embedding_cosine_to_teacher"], abs=1e-5)
        assert retrieval_accuracy(model, tok, held_out) == m["retrieval_accuracy"]
    # the compressed student started from the trained plain student: its kept layers and trained embeddings,
    # trimmed to the compressed vocabulary, encode as the report's "before" says
    from kdfast.models import distilbert_from_teacher, trim_vocabulary
    from kdfast.train.demo import COMPRESSED_LAYERS, STUDENT_LAYERS

    assert c["init_from_student_layers"] == list(COMPRESSED_LAYERS)
    assert c["init_from_teacher_layers"] == [STUDENT_LAYERS[i] for i in COMPRESSED_LAYERS]
    teacher_tok = AutoTokenizer.from_pretrained(teacher_dir)
    kept = [teacher_tok.convert_tokens_to_ids(t) for t in AutoTokenizer.from_pretrained(out / "compressed").get_vocab()]
    start, start_tok, _ = trim_vocabulary(
        distilbert_from_teacher(AutoModel.from_pretrained(out / "student"), layers=COMPRESSED_LAYERS).bert,
        teacher_tok, kept)
    cos = float((mean_pooled(start, start_tok, held_out) * teacher_emb).sum(-1).mean())
    assert cos == pytest.approx(c["embedding_cosine_to_teacher_before"], abs=1e-5)
    assert retrieval_accuracy(start, start_tok, held_out) == c["retrieval_accuracy_before"]
