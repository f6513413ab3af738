"""Run the benchmarks: ``python -m bench [NAME ...]`` (default: all).

Each benchmark module exposes ``run() -> dict`` and writes its JSON document
to ``bench/results/<name>.json``; this runner prints one summary line each.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path

BENCHES = ("api", "api_instructions", "rls", "fleet", "moves", "moves_workflow", "verify_load")
RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str]) -> int:
    names = argv or list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; choose from {', '.join(BENCHES)}", file=sys.stderr)
        return 2
    RESULTS.mkdir(exist_ok=True)
    for name in names:
        try:
            module = importlib.import_module(f"bench.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"bench.{name}":
                print(f"{name}: not available")
                continue
            raise
        start = time.monotonic()
        result = module.run()
        result.setdefault("elapsed_seconds", round(time.monotonic() - start, 1))
        path = RESULTS / f"{name}.json"
        path.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"{name}: {result.get('summary', '')}  ->  {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
