"""What every benchmark does with its table: print it and store it, with the command
that produced it, under ``benchmarks/results/<name>.{json,md}``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results"


def save(name: str, table: str, payload: dict) -> None:
    print(table)
    OUT.mkdir(parents=True, exist_ok=True)
    command = f"python benchmarks/{Path(sys.argv[0]).name} " + " ".join(sys.argv[1:])
    (OUT / f"{name}.json").write_text(json.dumps({"command": command, **payload}, indent=2))
    (OUT / f"{name}.md").write_text(f"`{command}`\n\n{table}\n")
