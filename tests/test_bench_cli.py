"""``kdfast bench`` as one loop over :data:`kdfast.bench.SUITES`: every suite has the one
signature ``run_suite(BenchOptions) -> Table``, the command runs the chosen ones in the suites'
order, tables go to stdout (unchanged by progress), progress lines to stderr (none with
``--no-progress``), and ``--json`` holds every row either way."""

import importlib
import inspect
import json

import pytest
import torch

from kdfast import bench
from kdfast.bench import BenchOptions, Table
from kdfast.bench.timing import Result
from kdfast.cli import main


def test_every_suite_has_the_one_signature():
    assert list(bench.SUITES) == ["kd_loss", "attention", "long_context", "models", "cache", "fused_linear_kd", "optim",
                                  "e2e", "e2e_modernbert"]
    for name in bench.SUITES:
        run_suite = importlib.import_module(f"kdfast.bench.{name}").run_suite
        params = list(inspect.signature(run_suite).parameters.values())
        assert len(params) == 1 and params[0].annotation in (BenchOptions, "BenchOptions"), name
        assert inspect.signature(run_suite).return_annotation in (Table, "Table"), name
        assert run_suite.__doc__, name


@pytest.fixture
def fake_suites(monkeypatch):
    """Every suite replaced by one that records the options it got and returns one row, so that the
    loop is tested without measuring anything."""
    calls = []

    def fake(name):
        def run_suite(opts: BenchOptions) -> Table:
            calls.append((name, opts))
            opts.progress(f"{name}: row 1")
            return Table([Result(name, f"case-{name}", "eager", 1.5, 1024, extra={"k": name})], f"TABLE {name}")
        return run_suite

    for name in list(bench.SUITES):
        monkeypatch.setitem(bench.SUITES, name, fake(name))
    return calls


def test_the_loop_runs_the_chosen_suites_in_order_with_the_flags(fake_suites, capsys, tmp_path):
    out = tmp_path / "r.json"
    rc = main(["bench", "--suites", "e2e", "optim", "kd_loss", "--repeat", "2", "--no-compile", "--dtype", "bf16",
               "--size", "64x300", "--tokens", "2x16", "--e2e-steps", "tinybert", "--json", str(out),
               "--device", "cpu"])
    assert rc == 0
    assert [name for name, _ in fake_suites] == ["kd_loss", "optim", "e2e"]  # the suites' order, not the flags'
    opts = fake_suites[0][1]
    assert opts.device == torch.device("cpu") and opts.repeat == 2 and not opts.compile_baseline
    assert opts.dtypes == (torch.bfloat16,) and opts.sizes == ((64, 300),) and opts.tokens == (2, 16)
    assert opts.e2e_steps == ("tinybert",) and not opts.quick
    captured = capsys.readouterr()
    stdout = captured.out
    assert stdout.index("TABLE kd_loss") < stdout.index("TABLE optim") < stdout.index("TABLE e2e")
    assert "row 1" not in stdout and "suite " not in stdout  # progress stays off stdout
    err = captured.err.splitlines()
    for i, name in enumerate(["kd_loss", "optim", "e2e"]):
        assert any(line.endswith(f"suite {name} ({i + 1}/3)") for line in err), err
        assert any(line.endswith(f"{name}: row 1") for line in err), err
    rows = json.loads(out.read_text())["results"]
    assert [(r["suite"], r["case"], r["ms"], r["peak_bytes"], r["extra"]) for r in rows] == [
        (name, f"case-{name}", 1.5, 1024, {"k": name}) for name in ("kd_loss", "optim", "e2e")]


def test_no_progress_leaves_stdout_and_json_as_they_were(fake_suites, capsys, tmp_path):
    outputs = {}
    for flags in ([], ["--no-progress"]):
        path = tmp_path / f"r{len(flags)}.json"
        assert main(["bench", "--suites", "cache", "models", "--json", str(path), "--device", "cpu", *flags]) == 0
        captured = capsys.readouterr()
        outputs[bool(flags)] = (captured.out, json.loads(path.read_text()), captured.err)
    assert outputs[True][:2] == outputs[False][:2]
    assert "suite models" in outputs[False][2]
    assert outputs[True][2] == ""


def test_default_suites_and_quick(fake_suites, capsys):
    assert main(["bench", "--quick", "--device", "cpu", "--no-progress"]) == 0
    assert [name for name, _ in fake_suites] == ["kd_loss"] and fake_suites[0][1].quick
    fake_suites.clear()
    assert main(["bench", "--device", "cpu", "--no-progress"]) == 0
    assert [name for name, _ in fake_suites] == list(bench.SUITES)
    assert fake_suites[-1][1].e2e_steps is None and fake_suites[-1][1].sizes is None


def test_e2e_steps_without_the_e2e_suite_is_one_line_exit_2(fake_suites, capsys):
    assert main(["bench", "--suites", "kd_loss", "--e2e-steps", "distilbert", "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().startswith("kdfast bench: error: --e2e-steps") and "Traceback" not in captured.err
    assert fake_suites == [] and "kdfast bench on" not in captured.out


def test_kd_loss_suite_for_real_with_row_progress(capsys):
    """One real suite through the loop: the measured rows' progress lines name each row."""
    assert main(["bench", "--suites", "kd_loss", "--size", "16x300", "--repeat", "1", "--no-compile",
                 "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "eager" in captured.out and "speed-up" in captured.out
    assert any(line.endswith("kd_loss: N=16 V=300 float32: eager (1/" + line.rsplit("/", 1)[-1])
               for line in captured.err.splitlines()), captured.err
    assert "kd_loss: N=16" not in captured.out
