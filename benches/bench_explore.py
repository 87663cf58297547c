"""How much exploring each named scenario takes: schedules, schedules cut by
partial-order reduction, distinct states and seconds, with and without POR,
within a preemption bound, for the buggy configuration and the fixed one.

Under pytest (benchmarks disabled) each configuration runs once at bound 1
and the table is printed; timings are never pass/fail. As a script, bound 2
(the bound the tests use)::

    .venv/bin/python benches/bench_explore.py [BOUND]
"""

from __future__ import annotations

import sys
from typing import Any

import pytest

from memattr.explore import explore
from memattr.explore_scenarios import build

CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("seed", {}),  # v11, lockdep off: the WARN
    ("seed", {"semantics": "6.8"}),
    ("straddle", {}),  # fix off: the race
    ("straddle", {"fix": True}),
    ("fault-conversion", {}),
    ("memslots", {}),
    ("gmem-close", {}),
]


def table(bound: int) -> list[str]:
    rows = [
        f"{'scenario':28} {'POR':4} {'schedules':>9} {'cut':>5} {'states':>7} {'seconds':>8}  found",
    ]
    for name, params in CONFIGS:
        label = name + "".join(f" {k}={v}" for k, v in params.items())
        for por in (True, False):
            r = explore(build(name, **params), bound=bound, por=por, minimise=False)
            found = ", ".join(sorted({f.bug.kind for f in r.findings})) or "-"
            rows.append(
                f"{label:28} {'on' if por else 'off':4} {r.schedules:9d} {r.pruned:5d} "
                f"{r.states:7d} {r.seconds:8.2f}  {found}"
            )
    return rows


def bench_explore_named_scenarios(benchmark: pytest.FixtureRequest) -> None:
    res = benchmark(lambda: explore(build("seed"), bound=2, minimise=False))  # type: ignore[operator]
    assert "WARNING" in {f.bug.kind for f in res.findings}
    rows = table(1)
    print("\n[bench_explore] bound 1\n" + "\n".join(rows))
    assert len(rows) == 1 + 2 * len(CONFIGS)


def main() -> int:
    bound = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    print(f"preemption bound {bound}")
    print("\n".join(table(bound)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
