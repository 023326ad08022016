"""Every ``--help`` answers without importing torch (nor pandas, matplotlib or optuna), and the
committed help index says what the registries say."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmark.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "torchaudio", "pandas", "matplotlib", "optuna")

# Runs the command line as `python -m benchmark` does and reports which heavy modules it loaded.
PROBE = """
import json, runpy, sys
heavy = json.loads(sys.argv[2])
sys.argv = ["benchmark", *json.loads(sys.argv[1])]
try:
    runpy.run_module("benchmark", run_name="__main__", alter_sys=True)
    code = 0
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "loaded": [m for m in heavy if m in sys.modules]}))
"""


def help_commands() -> list[list[str]]:
    """``--help`` of the top level and of every sub-command (and sub-sub-command), found in the parser."""
    commands = [["--help"], ["run", "--help", "--method", "udi", "--dataset", "cg-digits"]]

    def walk(parser, prefix: list[str]) -> None:
        for action in parser._actions:
            if hasattr(action, "choices") and isinstance(action.choices, dict):
                for name, child in action.choices.items():
                    commands.append([*prefix, name, "--help"])
                    walk(child, [*prefix, name])

    walk(build_parser([]), [])
    return commands


COMMANDS = help_commands()


def test_every_sub_command_is_covered() -> None:
    names = {c[0] for c in COMMANDS}
    assert {"run", "list", "sweep", "report", "tune", "perf", "bench", "data"} <= names
    assert ["data", "prepare", "--help"] in COMMANDS


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(c) for c in COMMANDS])
def test_help_imports_no_torch(argv: list[str]) -> None:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argv), json.dumps(HEAVY)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    seconds = time.perf_counter() - start
    print(f"python -m benchmark {' '.join(argv)}: {seconds:.2f}s")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["code"] == 0
    assert result["loaded"] == [], f"{' '.join(argv)} imported {result['loaded']}"
    assert "usage:" in proc.stdout


def test_committed_help_index_matches_the_registries() -> None:
    from benchmark.help_index import build_index, load_index

    fresh = json.loads(json.dumps(build_index()))
    assert load_index() == fresh, "benchmark/help_index.json is stale: run `python -m benchmark.help_index`"
    assert "udi" in fresh["methods"] and fresh["methods"]["udi"]["options"]
