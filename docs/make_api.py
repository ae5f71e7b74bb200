"""Write docs/api.md, the API reference: every public name of kdfast's user-facing modules, with its
signature and docstring, in the order of each module's ``__all__``.

    python docs/make_api.py          # rewrite docs/api.md
    python docs/make_api.py --check  # exit 1 when docs/api.md is not what the code says (a test runs this)
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "api.md"
sys.path.insert(0, str(OUT.parent.parent))  # this checkout's kdfast, not another one on the path

#: the modules users import, in the order the reference lists them
MODULES = (
    "kdfast",
    "kdfast.models",
    "kdfast.cache",
    "kdfast.train",
    "kdfast.integrations.transformers",
)


def _signature(obj: object) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return ""


def _entry(module: str, name: str, obj: object) -> list[str]:
    kind = "class" if inspect.isclass(obj) else "function" if callable(obj) else "value"
    head = f"### `{module}.{name}`"
    lines = [head, ""]
    if kind == "value":
        lines += ["```text", f"{name} = {obj!r}", "```", ""]
        return lines
    lines += ["```python", f"{'class ' if kind == 'class' else ''}{name}{_signature(obj)}", "```", ""]
    doc = inspect.getdoc(obj)
    if doc:
        lines += ["```text", doc, "```", ""]
    return lines


def render() -> str:
    """The whole reference as Markdown."""
    lines = ["# kdfast API reference", "",
             "Generated from the code by `python docs/make_api.py` (a test checks it is current): every public",
             "name of the modules below, its signature and its docstring, which gives the formula it computes.",
             "The user guide ([guide.md](guide.md)) says how the pieces fit together.", ""]
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        names = getattr(module, "__all__", None)
        if names is None:
            raise SystemExit(f"{module_name} has no __all__: list its public names there")
        lines += [f"## `{module_name}`", ""]
        summary = (inspect.getdoc(module) or "").split("\n\n")[0]
        if summary:
            lines += [summary, ""]
        for name in names:
            if name.startswith("__"):
                continue
            lines += _entry(module_name, name, getattr(module, name))
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with docs/api.md instead of writing it")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.is_file() or OUT.read_text() != text:
            print("docs/api.md is out of date: run `python docs/make_api.py`", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
