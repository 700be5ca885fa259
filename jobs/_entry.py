"""Shared by the job entrypoints: make `platform/` importable inside a Ray job's working dir (where r2v
is not pip-installed) and hand argv to the CLI, so a job and `r2v <stage>` run the same function."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))


def run(command: str) -> None:
    from r2v.cli import main

    sys.exit(main([command, *sys.argv[1:]]))
