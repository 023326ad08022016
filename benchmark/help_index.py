"""The option text that ``--help`` shows, and the method facts the report reads, without
importing torch.

Methods and datasets declare their options in ``Options`` dataclasses that live beside their
models and loaders, so reading them imports torch (seconds). ``--help`` must answer at once, so
what it shows of the plug-ins (names, one-line summaries, each option's name, default and help,
the encoder and fusion-head names), and each method's facts that the report needs
(benchmark.method_facts: table order, the reference method, report module, published figures),
are kept in a generated file, ``benchmark/help_index.json``,
committed with the code. ``python -m benchmark.help_index`` rewrites it from the registries;
a test asserts that the committed file equals what the registries give, so a changed option
that was not re-indexed fails the test suite rather than showing stale help.

Commands that run anything (``run``, ``list``, ``data``) read the registries themselves; only
the help text comes from this file.
"""

from __future__ import annotations

import json
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

INDEX_PATH = Path(__file__).with_name("help_index.json")
BUILT_IN = ("benchmark", "baselines", "udi")  # the suite's packages


def build_index() -> dict[str, Any]:
    """The index from the registries (imports every plug-in, hence torch)."""
    from benchmark.config import options_help
    from benchmark.registry import DATASETS, METHODS, list_encoders, list_fusions

    def entries(registry: Any, facts: Any = None) -> dict[str, Any]:
        # the suite's own entries: plug-ins from outside ($BMB_PLUGINS) are read when asked for
        return {name: {"summary": registry.get(name).summary,
                       "options": [list(row) for row in options_help(registry.get(name).Options)],
                       **({"facts": facts(registry.get(name))} if facts else {})}
                for name in registry.names() if registry.get(name).__module__.split(".")[0] in BUILT_IN}

    return {"methods": entries(METHODS, method_facts), "datasets": entries(DATASETS),
            "encoders": list_encoders(), "fusions": list_fusions()}


# A method's facts the report reads (benchmark.method_facts), kept here because the report runs
# without torch: name → how to read it from the class.
METHOD_FACTS = ("table_order", "reference", "single_modality", "report_module", "published")


def method_facts(cls: Any) -> dict[str, Any]:
    return {name: cls.fact(name) for name in METHOD_FACTS}


@lru_cache(maxsize=1)
def load_index() -> dict[str, Any]:
    """The committed index; an unreadable one gives empty listings (help still answers)."""
    try:
        return json.loads(INDEX_PATH.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"methods": {}, "datasets": {}, "encoders": [], "fusions": []}


def render_options(kind: str, name: str, rows: list[list[str]] | list[tuple[str, str, str]]) -> list[str]:
    """The lines that show one method's or dataset's options: name, help, default."""
    if not rows:
        return [f"{kind} {name} has no options of its own"]
    width = max(16, *(len(row[0]) + 1 for row in rows))
    lines = [f"{kind} {name} options (--set {kind}.<name>=value):"]
    lines += [f"  {n:<{width}} {h} [default {d}]" for n, d, h in rows]
    return lines


def write_index(path: Path = INDEX_PATH) -> None:
    path.write_text(json.dumps(build_index(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmark.help_index",
                                     description=f"Rewrite {INDEX_PATH.name} from the registries (after a "
                                                 "method's or dataset's options changed).")
    parser.add_argument("--check", action="store_true", help="only check: exit 1 if the file is stale")
    args = parser.parse_args(argv)
    if args.check:
        if load_index() != json.loads(json.dumps(build_index())):
            print(f"error: {INDEX_PATH} is stale; run `python -m benchmark.help_index`", file=sys.stderr)
            return 1
        return 0
    write_index()
    print(f"written {INDEX_PATH}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
