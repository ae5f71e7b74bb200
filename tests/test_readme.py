"""Every command and code block of README.md and the user guide (docs/guide.md) works as written.

- ``make`` targets named anywhere in the README exist in the Makefile and ``make -n`` accepts them
  as written (they are not run: they set up a venv, run the whole suite or need a GPU).
- Every line of a ```bash block is a ``make`` or a ``kdfast`` command; the ``kdfast`` ones (the
  Quickstart's) run, in-process through ``kdfast.cli.main``, in a temporary directory where the test
  puts what the README calls yours: a tiny BertForMaskedLM teacher with its tokenizer in
  ``my-teacher/``, text in ``my-corpus.txt``, GLUE-format SST-2 in ``glue/SST-2/``. The only edit
  to a command is ``--steps N`` -> ``--steps 2`` (and ``max_steps=N`` -> ``max_steps=2`` in the
  Quickstart's Python block), to keep the test short. A misspelt flag exits 2: the test fails.
- Every option of a ``kdfast`` command, in a ```text synopsis, a ```bash block or inline code in
  the prose, is spelt as that subcommand defines it.
- Every ```python block runs (exec) with small random inputs under the names it uses, except the
  one written for torchrun, which must parse and name only what kdfast exports.
"""

from __future__ import annotations

import ast
import random
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kdfast
from kdfast.cli import build_parser, main
from tests.tiny_teacher import save_tiny_bert_teacher
from tests.train.glue_data import FILLER, NEGATIVE, POSITIVE, sentiment_sentence, write_sst2

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
GUIDE = ROOT / "docs" / "guide.md"


def fenced_blocks(text: str) -> list[tuple[str, str, str]]:
    """(language, body, section heading) of every fenced block."""
    blocks, section, lang, body = [], "", None, []
    for line in text.splitlines():
        if lang is None and line.startswith("## "):
            section = line[3:]
        if line.startswith("```"):
            if lang is None:
                lang, body = line[3:].strip(), []
            else:
                blocks.append((lang, "\n".join(body), section))
                lang = None
        elif lang is not None:
            body.append(line)
    assert lang is None, "README.md has an unclosed code fence"
    return blocks


def commands(body: str) -> list[str]:
    """The commands of a shell or synopsis block: comments dropped, indented lines joined to the one above."""
    out: list[str] = []
    for line in body.splitlines():
        code = line.split(" #", 1)[0].rstrip() if not line.lstrip().startswith("#") else ""
        code = code.removesuffix("\\").rstrip()  # a shell line continued on the next
        if not code.strip():
            continue
        if code[0].isspace() and out:
            out[-1] += " " + code.strip()
        else:
            out.append(code.strip())
    return out


BLOCKS = fenced_blocks(README.read_text())
#: the user guide's blocks: synopses and reference Python, checked like the README's
GUIDE_BLOCKS = fenced_blocks(GUIDE.read_text())


def test_the_readme_has_the_newcomers_sections_in_order():
    headings = [line[3:] for line in README.read_text().splitlines() if line.startswith("## ")]
    assert headings[:3] == ["Quickstart with your own teacher", "What is in it", "Benchmarks"]
    assert headings[-1] == "Layout"
    assert (ROOT / "benchmarks" / "README.md").is_file() and "benchmarks/README.md" in README.read_text()
    assert "docs/guide.md" in README.read_text() and "docs/api.md" in README.read_text()


def test_the_readme_is_a_users_guide_of_at_most_250_lines():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    assert not re.search(r"\bissue #?\d+|\bsessions?\b|load average|\blent\b", text, re.I)


def test_the_api_reference_is_what_the_code_says():
    """docs/api.md is generated from the docstrings; `python docs/make_api.py` rewrites it."""
    check = subprocess.run([sys.executable, str(ROOT / "docs" / "make_api.py"), "--check"], cwd=ROOT,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr.strip()


def test_links_to_files_in_the_repository_resolve():
    for doc in (README, GUIDE):
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", doc.read_text()):
            if "://" not in target:
                assert (doc.parent / target).exists(), f"{doc.name}: link to {target} does not resolve"


def test_make_targets_exist_and_make_dry_runs_them():
    text = README.read_text() + GUIDE.read_text()
    invocations = set(re.findall(r"(?:^|`|\$ )((?:[A-Z_]+=\S+ )*make [a-z][a-z-]*(?: [A-Z_]+=\S+)*)", text, re.M))
    for lang, body, _ in BLOCKS + GUIDE_BLOCKS:
        if lang in ("bash", "text"):
            invocations |= {c for c in commands(body) if c.startswith("make ")}
    targets = set(re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), re.M))
    assert {"demo", "test", "gpu-check"} <= {re.search(r"make ([a-z-]+)", i).group(1) for i in invocations}
    for invocation in sorted(invocations):
        words = shlex.split(invocation)
        target = words[words.index("make") + 1]
        assert target in targets, f"README: `{invocation}`: the Makefile has no target {target!r}"
        variables = [w for w in words if "=" in w and not w.startswith("$")]
        dry = subprocess.run(["make", "-n", target, *variables], cwd=ROOT, capture_output=True, text=True)
        assert dry.returncode == 0, f"`make -n {target}`: {dry.stderr.strip()}"


def test_every_shell_line_is_make_or_a_kdfast_command_run_by_the_quickstart_test():
    for lang, body, section in BLOCKS:
        if lang != "bash":
            continue
        for command in commands(body):
            assert command.startswith(("make ", "kdfast ")), f"README ({section}): `{command}` is neither make " \
                                                            "nor kdfast: run it in tests/test_readme.py"
            if command.startswith("kdfast "):
                assert section.startswith("Quickstart"), f"README ({section}): `{command}` runs nowhere; " \
                                                         "put it in a ```text synopsis or in the Quickstart"


def _subparser(parser, words: list[str]):
    """The parser of ``kdfast <sub> [<subsub>]`` and the words after the subcommands."""
    while words:
        actions = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
        if not actions or words[0] not in actions[0].choices:
            break
        parser, words = actions[0].choices[words[0]], words[1:]
    return parser, words


def test_every_kdfast_option_in_the_readme_is_spelt_as_the_command_defines_it():
    """Synopses, the Quickstart's commands and inline commands: each ``--flag`` exactly (argparse
    would also accept an abbreviation when the Quickstart runs)."""
    inline = [("prose", " ".join(span.split())) for doc in (README, GUIDE)
              for span in re.findall(r"`(kdfast [^`]+)`", doc.read_text())]
    listed = [(section, command) for lang, body, section in BLOCKS + GUIDE_BLOCKS if lang in ("text", "bash")
              for command in commands(body)]
    checked = 0
    for section, command in listed + inline:
        if command.startswith("kdfast "):
            parser, rest = _subparser(build_parser(), command.split()[1:])
            assert parser.prog != "kdfast", f"README ({section}): `{command}`: no such subcommand"
            known = {s for a in parser._actions for s in a.option_strings}
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", " ".join(rest)):
                assert flag in known, f"README ({section}): `{command}`: {parser.prog} has no option {flag}"
                checked += 1
    assert checked >= 40 and len(inline) >= 5  # synopses of demo, cache, bench, distill, eval; the Quickstart; prose


# --- the Quickstart, run as written ------------------------------------------------------------


def _small_steps(command: str) -> str:
    return re.sub(r"--steps \d+", "--steps 2", command)


def _quickstart() -> tuple[list[str], str]:
    shell = [b for lang, b, s in BLOCKS if lang == "bash" and s.startswith("Quickstart")]
    python = [b for lang, b, s in BLOCKS if lang == "python" and s.startswith("Quickstart")]
    assert len(shell) == 1 and len(python) == 1
    return commands(shell[0]), python[0]


def test_quickstart_runs_as_written(tmp_path, monkeypatch, capsys):
    """The Quickstart's commands and its Trainer block, in order, on a tiny 4-layer teacher
    (4 layers so that the block's 4-layer TinyBERT student maps one layer to one)."""
    rng = random.Random(0)
    words = sorted({*FILLER, *POSITIVE, *NEGATIVE})
    save_tiny_bert_teacher(tmp_path / "my-teacher", words, hidden=32, layers=4, heads=4, positions=128)
    # enough text for 16 packed 128-token rows (the recipe's batch) and a held-out tenth
    (tmp_path / "my-corpus.txt").write_text("\n".join(sentiment_sentence(rng, rng.random() < 0.5)
                                                      for _ in range(330)) + "\n")
    write_sst2(tmp_path / "glue" / "SST-2", n_train=32, n_dev=16)
    monkeypatch.chdir(tmp_path)
    shell, python = _quickstart()
    assert [c.split()[:3] for c in shell] == [["kdfast", "cache", "build"], ["kdfast", "cache", "verify"],
                                             ["kdfast", "distill", "--recipe"], ["kdfast", "eval", "--task"]]
    for command in shell:
        argv = shlex.split(_small_steps(command))[1:]
        try:
            rc = main([*argv, "--no-progress"] if argv[0] in ("distill", "eval") else argv)
        except SystemExit as e:
            pytest.fail(f"README: `{command}` exits {e.code}: {capsys.readouterr().err.strip()}")
        assert rc == 0, f"README: `{command}` exits {rc}: {capsys.readouterr().err.strip()}"
    assert (tmp_path / "my-cache" / "manifest.json").is_file()
    assert (tmp_path / "runs" / "distilbert" / "student" / "config.json").is_file()
    assert "sst2" in capsys.readouterr().out

    code = re.sub(r"max_steps=\d+", "max_steps=2", python)
    assert code != python  # the block trains for max_steps, which the test shortens
    exec(compile(code, "README.md (Quickstart)", "exec"), {"__name__": "readme"})
    from transformers import BertForMaskedLM

    _, info = BertForMaskedLM.from_pretrained(tmp_path / "runs" / "trainer" / "student", output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"]
    assert (tmp_path / "runs" / "trainer" / "student" / "kd_projections.safetensors").is_file()


# --- the reference Python blocks -------------------------------------------------------------------

def _inputs() -> dict:
    """Small random inputs under the names the README's snippets use."""
    from transformers import BertConfig, BertForMaskedLM

    from kdfast.models import tinybert

    B, L, V, H, dh, d_s, d_t = 2, 7, 37, 2, 4, 12, 16
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 5:] = 0
    labels = torch.randint(0, V, (B, L)).masked_fill(torch.rand(B, L) < 0.6, -100)
    labels[:, 1] = 3
    labels = labels.masked_fill(mask == 0, -100)
    teacher = BertForMaskedLM(BertConfig(vocab_size=V, hidden_size=d_t, num_hidden_layers=2, num_attention_heads=H,
                                         intermediate_size=20, max_position_embeddings=16)).eval()
    student = tinybert("tinybert-4", vocab_size=V, hidden_size=d_s, num_hidden_layers=2, num_attention_heads=H,
                       intermediate_size=20, max_position_embeddings=16)
    return dict(
        torch=torch, kdfast=kdfast,
        student_logits=torch.randn(B, L, V, requires_grad=True), teacher_logits=torch.randn(B, L, V),
        mlm_labels=labels, attention_mask=mask,
        student_scores=torch.randn(B, H, L, L, requires_grad=True), teacher_scores=torch.randn(B, H, L, L),
        q_s=torch.randn(B, H, L, dh, requires_grad=True), k_s=torch.randn(B, H, L, dh, requires_grad=True),
        q_t=torch.randn(B, H, L, dh), k_t=torch.randn(B, H, L, dh),
        h_s=torch.randn(B, L, d_s, requires_grad=True), W_s=torch.randn(V, d_s, requires_grad=True),
        b_s=torch.randn(V, requires_grad=True), h_t=torch.randn(B, L, d_t), W_t=torch.randn(V, d_t),
        b_t=torch.randn(V),
        teacher=teacher, student=student,
        batch={"input_ids": torch.randint(0, V, (B, L)), "attention_mask": mask},
    )


def test_reference_python_blocks_run():
    ran = 0
    for lang, body, section in BLOCKS + GUIDE_BLOCKS:
        if lang != "python" or section.startswith("Quickstart"):
            continue
        if "under torchrun" in body:
            _names_are_kdfasts(body)
            continue
        namespace = _inputs()
        exec(compile(body, f"README.md ({section})", "exec"), namespace)
        loss = namespace.get("loss")
        assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and bool(torch.isfinite(loss)), section
        ran += 1
    assert ran >= 3  # losses API, capture, fused linear KD


def _names_are_kdfasts(body: str) -> None:
    """The torchrun block: it parses, and each function it calls is exported by kdfast.train (or is
    torch's / transformers')."""
    import kdfast.train as train
    import kdfast.train.distributed as distributed

    called = {node.func.id for node in ast.walk(ast.parse(body))
              if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    assert called, body
    for name in called - {"BertForMaskedLM"}:
        assert hasattr(train, name) or hasattr(distributed, name), f"README torchrun block: {name} is not kdfast's"
