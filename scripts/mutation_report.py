"""Prints the mutation score of each module that `make mutate` mutates, from mutmut's results.

Reads the module list from ``[tool.mutmut] only_mutate`` in pyproject.toml and each module's results from
``mutants/<path>.meta`` (written by ``mutmut run``). A mutant counts as caught when a test failed on it
or it timed out; survivors and mutants no test reached ("alive") and mutants not run (an interrupted run)
count against the score.
Usage: ``python scripts/mutation_report.py [--min PERCENT] [--survivors]``; exits 1 when a module scores
below ``--min`` or has no results.
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from collections import Counter
from pathlib import Path

from mutmut.stats import status_by_exit_code

CAUGHT = {"killed", "timeout", "caught by type check"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min", type=float, default=90.0, help="lowest acceptable score per module, in percent")
    parser.add_argument("--survivors", action="store_true", help="list the mutants that were not caught")
    parser.add_argument("--markdown", action="store_true", help="print the table in Markdown (for docs/testing.md)")
    args = parser.parse_args()
    modules = tomllib.loads(Path("pyproject.toml").read_text())["tool"]["mutmut"]["only_mutate"]
    failing = 0
    row = "| {} | {} | {} | {} | {} | {} | {} |" if args.markdown else "{:32} {:>7} {:>6} {:>7} {:>5} {:>7} {:>6}"
    print(row.format("module", "mutants", "caught", "timeout", "alive", "not run", "score"))
    if args.markdown:
        print("|---|---:|---:|---:|---:|---:|---:|")
    missed: list[str] = []
    for module in modules:
        meta = Path("mutants") / f"{module}.meta"
        results = json.loads(meta.read_text())["exit_code_by_key"] if meta.exists() else {}
        status = {name: status_by_exit_code[code] for name, code in results.items()}
        counts = Counter(status.values())
        caught = sum(counts[s] for s in CAUGHT)
        total = len(status)
        score = 100.0 * caught / total if total else 0.0
        name = module.removeprefix("flowsteer/")
        not_run = counts["not checked"]
        print(row.format(name, total, caught, counts["timeout"], total - caught - not_run, not_run, f"{score:.1f}%"))
        missed += [f"{n}: {s}" for n, s in sorted(status.items()) if s not in CAUGHT]
        if not total or score < args.min:
            failing += 1
    if args.survivors and missed:
        print("\nnot caught:\n  " + "\n  ".join(missed))
    if failing:
        print(f"\n{failing} module(s) below {args.min:g}% (or without results)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
