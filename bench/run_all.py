"""Run every benchmark in bench/ and write one Markdown table (`make bench`).

Each `bench_*.py` exposes `run() -> list[dict]` with rows {benchmark, metric, value, baseline,
ratio, note}; every ratio is against a baseline measured in the same run. The table goes to
stdout and to bench/results/benchmarks.md, headed by the machine it was made on.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import machine  # noqa: E402


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    only = set(argv if argv is not None else sys.argv[1:])
    rows: list[dict] = []
    failures = []
    for path in sorted(HERE.glob("bench_*.py")):
        if only and path.stem not in only and path.stem.removeprefix("bench_") not in only:
            continue
        started = time.monotonic()
        print(f"running {path.name} ...", file=sys.stderr, flush=True)
        try:
            rows.extend(_load(path).run())
        except Exception as exc:  # a benchmark's failure is reported, the others still run
            failures.append(f"{path.name}: {type(exc).__name__}: {exc}")
        print(f"  {path.name} took {time.monotonic() - started:.1f} s", file=sys.stderr)

    lines = [
        f"Machine: {machine()}. Date: {time.strftime('%Y-%m-%d')}. "
        "Times are medians of repeated runs; each ratio is against a baseline measured in the "
        "same run.",
        "",
        "| benchmark | metric | value | baseline | ratio | note |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            "| {} | {} | {} | {} | {} | {} |".format(
                row.get("benchmark", ""), row.get("metric", ""), _fmt(row.get("value")),
                _fmt(row.get("baseline")), _fmt(row.get("ratio")), row.get("note", ""),
            )
        )
    for failure in failures:
        lines.append(f"\nFAILED: {failure}")
    table = "\n".join(lines) + "\n"
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "benchmarks.md").write_text(table)
    sys.stdout.write(table)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
