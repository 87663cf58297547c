"""``memattr explore``: the interleaving explorer from the command line.

``memattr explore SCENARIO`` explores a named scenario (``--list`` names
them) within a preemption bound, prints what it covered and, for each bug,
a kernel-style splat with each task's call trace and the step-by-step
schedule, and saves the schedule to ``--out`` (default ./results) as
``explore-SCENARIO-KIND.json``. ``memattr explore --replay FILE`` reruns a
saved schedule exactly and prints the same report.

Exit status: 0 when nothing was found, 1 when a bug is shown (found, or
reproduced by ``--replay``), 2 on bad arguments or a schedule that does not
replay as saved.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from rich.console import Console

from memattr.explore import (
    ScheduleMismatch,
    explore,
    load_schedule,
    replay,
    save_schedule,
)
from memattr.explore_report import render, splat
from memattr.explore_scenarios import SCENARIOS, build


def add_parser(sub: Any) -> None:
    e = sub.add_parser(
        "explore",
        help="explore interleavings of concurrent KVM operations on one VM (find races)",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    e.add_argument("scenario", nargs="?", help=f"one of: {', '.join(SCENARIOS)}")
    e.add_argument("--replay", metavar="FILE", help="rerun a saved schedule exactly")
    e.add_argument("--list", action="store_true", help="list the named scenarios")
    e.add_argument("--semantics", help="kernel semantics (default: the scenario's: v11 for seed, else 6.8)")
    e.add_argument(
        "--lockdep",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the lock checker (default: off for seed, as on a production kernel; on otherwise)",
    )
    e.add_argument(
        "--fix",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="straddle only: mmu.invalidate_straddling_hugepages (default off: the race)",
    )
    e.add_argument("--store", choices=("rangetree", "xarray"), default=None)
    e.add_argument("--bound", type=int, default=2, help="preemption bound (default 2)")
    e.add_argument("--no-por", action="store_true", help="no partial-order reduction")
    e.add_argument("--random", type=int, default=0, metavar="N", help="N seeded random schedules beyond the bound")
    e.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    e.add_argument("--budget", type=float, default=None, metavar="SECONDS", help="time budget")
    e.add_argument("--stop-at-first", action="store_true", help="stop at the first bug")
    e.add_argument("--out", default="results", help="where schedules are saved (default ./results)")
    e.add_argument("--no-save", action="store_true", help="do not save schedules")


def _params(args: argparse.Namespace) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if args.semantics is not None:
        params["semantics"] = args.semantics
    if args.lockdep is not None:
        params["lockdep"] = args.lockdep
    if args.store is not None:
        params["store"] = args.store
    if args.fix is not None:
        if args.scenario != "straddle":
            raise ValueError("--fix applies to the straddle scenario only")
        params["fix"] = args.fix
    return params


def _print(console: Console, text: str) -> None:
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def cmd_explore(args: argparse.Namespace, console: Console) -> int:
    if args.list:
        for name, factory in SCENARIOS.items():
            sc = factory()
            _print(console, f"{name:18} {sc.description} ({', '.join(f'{k}={v}' for k, v in sc.params.items())})")
        return 0
    if args.replay:
        if args.scenario:
            raise ValueError("give a scenario or --replay FILE, not both")
        name, params, choices, expected = load_schedule(args.replay)
        sc = build(name, **params)
        try:
            run = replay(sc, choices)
        except ScheduleMismatch as e:
            _print(console, f"memattr explore: {args.replay} does not replay: {e}")
            return 2
        _print(console, splat(sc, run))
        got = None if run.bug is None else {"kind": run.bug.kind, "message": run.bug.message}
        want = None if expected is None else {"kind": expected.get("kind"), "message": expected.get("message")}
        if got != want:
            _print(console, f"\nmemattr explore: the replay differs from the saved run: saved {want}, got {got}")
            return 2
        _print(console, f"\nreplayed {args.replay}: the same {run.bug.kind if run.bug else 'clean run'}, "
                        f"{len(run.choices)} steps")
        return 1 if run.bug is not None else 0
    if not args.scenario:
        raise ValueError("name a scenario (--list shows them) or --replay FILE")
    if args.bound < 0 or args.random < 0:
        raise ValueError("--bound and --random must be >= 0")
    try:
        sc = build(args.scenario, **_params(args))
    except TypeError as e:
        raise ValueError(f"scenario {args.scenario}: {e}") from None
    res = explore(
        sc,
        bound=args.bound,
        por=not args.no_por,
        random_schedules=args.random,
        seed=args.seed,
        budget=args.budget,
        stop_at_first=args.stop_at_first,
    )
    _print(console, res.summary())
    for f in res.findings:
        _print(console, "")
        _print(console, render(sc, f))
        if not args.no_save:
            os.makedirs(args.out, exist_ok=True)
            path = os.path.join(args.out, f"explore-{sc.name}-{f.bug.kind.lower()}.json")
            save_schedule(path, sc, f)
            _print(console, f"\nschedule saved: {path} (memattr explore --replay {path})")
    return 1 if res.findings else 0


__all__ = ["add_parser", "cmd_explore"]
