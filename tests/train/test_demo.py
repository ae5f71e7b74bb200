"""The embedded demo end to end on a small slice (the full run is `make demo`)."""

import json

import pytest

from kdfast.defaults import minilm_teacher_dir


def test_demo_small_run(tmp_path):
    try:
        minilm_teacher_dir()
    except FileNotFoundError as e:
        pytest.fail(f"the default teacher must be installed by the set-up: {e}")
    from kdfast.train.demo import format_report, run_demo

    report = run_demo(str(tmp_path / "demo"), steps=3, batch_size=8, max_length=32, max_paragraphs=60,
                      progress=False)
    s, t = report["student"], report["teacher"]
    assert s["params"] < t["params"] and s["layers"] == 3
    assert 0 <= s["retrieval_accuracy"] <= 1 and 0 < t["retrieval_accuracy"] <= 1
    assert report["loss"]["last"]["step"] == 3
    table = format_report(report)
    assert "retrieval accuracy" in table and "retained" in table
    out = tmp_path / "demo"
    assert json.loads((out / "report.json").read_text())["config"]["steps"] == 3
    assert (out / "loss.png").stat().st_size > 1000
    assert (out / "student" / "config.json").is_file()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
