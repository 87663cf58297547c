"""A deterministic interleaving explorer for KVM's memory-attribute paths.

Two or more actors (``set_memory_attributes``, a guest_memfd hole punch or
close, a fault, a memslot delete or move, a dirty-logging toggle, or any
function over a Vm) run over one Vm as threads that the explorer schedules
one at a time, switching only at the kernel's step boundaries: lock acquire
and release (slots_lock, mmu_lock, a guest_memfd's invalidation lock), each
gfn-range handler, and each half of the read-modify-writes of
``mmu_invalidate_in_progress`` and ``mmu_invalidate_seq``. The actors run
the ordinary driver over the core's steps (:mod:`memattr.sched` lists the
points): nothing here knows a kernel rule.

A schedule is the list of actor names chosen at each decision; the same
schedule always replays the same run.

Exploration (:func:`explore`):

- exhaustive within a preemption bound ``k``: every schedule that switches
  away from a runnable actor at most ``k`` times (switching when an actor
  blocks or ends is free), depth first;
- partial-order reduction with sleep sets over each step's footprint
  (:mod:`memattr.explore_steps`): after exploring step ``a`` at a decision,
  schedules that start with an independent step ``b`` and then ``a`` are the
  same run, and are cut;
- seeded random schedules beyond the bound;
- counts of schedules and distinct states (hashes of the VM's state and of
  where each actor is), a time budget.

Findings (:class:`memattr.explore_run.Bug`) are minimised (fewest context
switches that still show the same bug), replayed with tracing, and reported
as a kernel-style splat with each task's call trace and a timeline
(:mod:`memattr.explore_report`); :func:`save_schedule` writes a file that
``memattr explore --replay FILE`` reruns exactly.

Python API::

    from memattr.explore import Actor, Scenario, explore
    def setup():
        vm = Vm(KVM_X86_SW_PROTECTED_VM, semantics="v11", lockdep=False)
        ...
        return vm
    sc = Scenario("mine", setup, [Actor("a", lambda vm: ...), Actor("b", ...)])
    result = explore(sc, bound=2)
    print(result.summary()); [print(render(sc, b)) for b in result.bugs]
"""

from __future__ import annotations

import json
import random as _random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from memattr.explore_run import (
    Actor,
    Bug,
    Decision,
    Execution,
    RunResult,
    ScheduleMismatch,
    replay_chooser,
)
from memattr.explore_steps import independent

SCHEDULE_FORMAT = "memattr-schedule/1"
_KIND_ORDER = {"WARNING": 0, "KVM_BUG_ON": 1, "lockdep": 2, "invariant": 3, "in_progress": 4,
               "deadlock": 5, "livelock": 6, "exception": 7}


@dataclass
class Scenario:
    """Actors over the Vm ``setup()`` builds (a fresh one per run; it may
    return ``(vm, env)`` and actors then get ``env`` as a second argument).
    ``name`` and ``params`` identify a named scenario for replay files."""

    name: str
    setup: Callable[[], Any]
    actors: Sequence[Actor]
    description: str = ""
    params: dict[str, Any] = field(default_factory=dict)

    def run(self, choose: Callable[[Decision], str | None], *, trace: bool = False,
            fingerprints: bool = True) -> RunResult:
        names = [a.name for a in self.actors]
        if len(set(names)) != len(names) or len(names) < 1:
            raise ValueError(f"actor names must be unique and non-empty, got {names}")
        return Execution(self.setup, self.actors, choose, trace=trace,
                         fingerprints=fingerprints).run()


@dataclass
class Finding:
    """A bug and the (minimised) schedule that shows it."""

    bug: Bug
    schedule: list[str]
    # context switches (one after an actor blocked or ended is not a preemption)
    switches: int
    found_after: int  # schedules run when it was first found


@dataclass
class ExploreResult:
    scenario: str
    bound: int
    por: bool
    schedules: int = 0  # runs that went to the end (or to a bug)
    pruned: int = 0  # runs cut by the sleep sets (redundant)
    random_schedules: int = 0
    states: int = 0
    seconds: float = 0.0
    exhaustive: bool = False  # every schedule within the bound was covered
    findings: list[Finding] = field(default_factory=list)

    @property
    def bugs(self) -> list[Finding]:
        return self.findings

    def summary(self) -> str:
        cover = "complete" if self.exhaustive else "incomplete (budget or stop at first bug)"
        lines = [
            f"scenario {self.scenario}: preemption bound {self.bound}, "
            f"{'sleep-set POR' if self.por else 'no POR'}: {self.schedules} schedules "
            f"({cover}), {self.pruned} cut as redundant, {self.random_schedules} random, "
            f"{self.states} distinct states, {self.seconds:.2f} s",
        ]
        if not self.findings:
            lines.append("no bug found")
        for f in self.findings:
            lines.append(
                f"FOUND {f.bug.kind}: {f.bug.message} (task {f.bug.actor or '-'}; after "
                f"{f.found_after} schedules; {f.switches} context switches, "
                f"{len(f.schedule)} steps)"
            )
        return "\n".join(lines)


def context_switches(choices: Sequence[str]) -> int:
    """Context switches in a schedule (an upper bound on its preemptions:
    a switch after an actor finished or blocked is free)."""
    return sum(1 for a, b in zip(choices, choices[1:]) if a != b)


@dataclass
class _Node:
    enabled: list[str]
    pending: dict[str, Any]
    last: str | None
    preempt: int  # preemptions before this decision
    sleep: set[str]
    done: set[str] = field(default_factory=set)
    chosen: str = ""

    def cost(self, a: str) -> int:
        return 1 if self.last is not None and self.last in self.enabled and a != self.last else 0


class _Dfs:
    """Depth-first search over decisions, stateless (each schedule reruns
    from the start), bounded in preemptions, with sleep sets."""

    def __init__(self, bound: int, por: bool) -> None:
        self.bound = bound
        self.por = por
        self.stack: list[_Node] = []

    def choose(self, d: Decision) -> str | None:
        i = d.index
        if i < len(self.stack):
            node = self.stack[i]
            if node.enabled != d.enabled:
                raise ScheduleMismatch(
                    f"decision {i}: enabled {d.enabled}, before {node.enabled}: the run is not "
                    f"deterministic"
                )
            return node.chosen
        sleep: set[str] = set()
        preempt = 0
        if self.stack:
            parent = self.stack[-1]
            preempt = parent.preempt + parent.cost(parent.chosen)
            if self.por:
                chosen_fp = parent.pending[parent.chosen]
                for t in parent.sleep | (parent.done - {parent.chosen}):
                    if t in parent.pending and independent(parent.pending[t], chosen_fp):
                        sleep.add(t)
        node = _Node(list(d.enabled), dict(d.pending), d.last, preempt, sleep)
        pick = self._first(node)
        if pick is None:
            return None  # every continuation is asleep or over the bound
        node.chosen = pick
        node.done.add(pick)
        self.stack.append(node)
        return pick

    def _first(self, node: _Node) -> str | None:
        order = list(node.enabled)
        if node.last in order:  # no preemption first
            order.remove(node.last)  # type: ignore[arg-type]
            order.insert(0, node.last)  # type: ignore[arg-type]
        for a in order:
            if a not in node.done and a not in node.sleep and node.preempt + node.cost(a) <= self.bound:
                return a
        return None

    def backtrack(self) -> bool:
        """Moves to the next unexplored schedule; False when none is left."""
        while self.stack:
            node = self.stack[-1]
            pick = self._first(node)
            if pick is not None:
                node.chosen = pick
                node.done.add(pick)
                return True
            self.stack.pop()
        return False


def explore(
    scenario: Scenario,
    *,
    bound: int = 2,
    por: bool = True,
    random_schedules: int = 0,
    seed: int = 0,
    budget: float | None = None,
    stop_at_first: bool = False,
    minimise: bool = True,
) -> ExploreResult:
    """Explores ``scenario``: every schedule within ``bound`` preemptions
    (depth first, sleep sets if ``por``), then ``random_schedules`` seeded
    random ones; stops when ``budget`` seconds are spent, or at the first
    bug with ``stop_at_first``. One finding per distinct bug, with the
    fewest preemptions seen, minimised if ``minimise``."""
    t0 = time.perf_counter()
    res = ExploreResult(scenario.name, bound, por)
    states: set[int] = set()
    found: dict[tuple[str, str, str | None], Finding] = {}

    def over_budget() -> bool:
        return budget is not None and time.perf_counter() - t0 > budget

    def record(run: RunResult, n: int) -> bool:
        states.update(run.states)
        if run.bug is None:
            return False
        sig = run.bug.signature
        p = context_switches(run.choices)
        if sig not in found or p < found[sig].switches:
            found[sig] = Finding(run.bug, run.choices, p, found[sig].found_after if sig in found else n)
        return True

    dfs = _Dfs(bound, por)
    stopped = False
    while True:
        run = scenario.run(dfs.choose)
        if run.pruned:
            res.pruned += 1
        else:
            res.schedules += 1
        if record(run, res.schedules + res.pruned) and stop_at_first:
            stopped = True
            break
        if not dfs.backtrack():
            res.exhaustive = True
            break
        if over_budget():
            stopped = True
            break
    rng = _random.Random(seed)
    for _ in range(random_schedules):
        if stopped and stop_at_first or over_budget():
            break
        run = scenario.run(lambda d: rng.choice(d.enabled))
        res.random_schedules += 1
        if record(run, res.schedules + res.pruned + res.random_schedules) and stop_at_first:
            break
    res.states = len(states)
    for f in found.values():
        if minimise:
            f.schedule = minimise_schedule(scenario, f.schedule, f.bug)
            f.switches = context_switches(f.schedule)
        res.findings.append(f)
    # The kernel's own checks first, then what the model adds.
    res.findings.sort(key=lambda f: (_KIND_ORDER.get(f.bug.kind, 9), f.found_after))
    res.seconds = time.perf_counter() - t0
    return res


def _blocks(choices: Sequence[str]) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for c in choices:
        if out and out[-1][0] == c:
            out[-1] = (c, out[-1][1] + 1)
        else:
            out.append((c, 1))
    return out


def _expand(blocks: Sequence[tuple[str, int]]) -> list[str]:
    return [a for a, n in blocks for _ in range(n)]


def minimise_schedule(scenario: Scenario, choices: Sequence[str], bug: Bug) -> list[str]:
    """A schedule with as few context switches as can be found that still
    shows ``bug`` (same signature): greedily drops or merges blocks of
    consecutive steps of one actor, replaying tolerantly; returns the exact
    choices of the best run (so it replays strictly)."""
    best = list(choices)
    improved = True
    while improved:
        improved = False
        blocks = _blocks(best)
        for i in range(len(blocks)):
            for cand in (blocks[:i] + blocks[i + 1:], blocks[:i]):
                run = scenario.run(replay_chooser(_expand(cand), tolerant=True), fingerprints=False)
                if (
                    run.bug is not None
                    and run.bug.signature == bug.signature
                    and (context_switches(run.choices), len(run.choices)) < (context_switches(best), len(best))
                ):
                    best = run.choices
                    improved = True
                    break
            if improved:
                break
    return best


def replay(scenario: Scenario, choices: Sequence[str], *, trace: bool = True) -> RunResult:
    """Reruns ``choices`` exactly (ScheduleMismatch if an actor listed cannot
    run where it is listed)."""
    return scenario.run(replay_chooser(choices), trace=trace, fingerprints=False)


# --- schedule files -----------------------------------------------------------------------


def save_schedule(path: str, scenario: Scenario, finding: Finding) -> None:
    """Writes the finding's schedule as JSON: the named scenario and its
    parameters, the choices (run-length encoded) and what it shows."""
    doc = {
        "format": SCHEDULE_FORMAT,
        "scenario": scenario.name,
        "params": scenario.params,
        "schedule": [[a, n] for a, n in _blocks(finding.schedule)],
        "bug": {"kind": finding.bug.kind, "message": finding.bug.message,
                "actor": finding.bug.actor, "rip": finding.bug.rip},
    }
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


def load_schedule(path: str) -> tuple[str, dict[str, Any], list[str], dict[str, Any] | None]:
    """(scenario name, params, choices, expected bug) from a schedule file;
    ValueError naming what is wrong with it."""
    with open(path, encoding="utf-8") as f:
        try:
            doc = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a schedule file: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != SCHEDULE_FORMAT:
        raise ValueError(f"{path}: not a schedule file (format must be {SCHEDULE_FORMAT!r})")
    name, params, sched = doc.get("scenario"), doc.get("params", {}), doc.get("schedule")
    if not isinstance(name, str) or not isinstance(params, dict) or not isinstance(sched, list):
        raise ValueError(f"{path}: scenario, params and schedule are required")
    choices: list[str] = []
    for item in sched:
        if (
            not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str)
            or type(item[1]) is not int or item[1] < 1
        ):
            raise ValueError(f"{path}: schedule entries must be [actor, count >= 1], got {item!r}")
        choices.extend([item[0]] * item[1])
    bug = doc.get("bug")
    return name, params, choices, bug if isinstance(bug, dict) else None


__all__ = [
    "Actor",
    "Bug",
    "ExploreResult",
    "Finding",
    "Scenario",
    "explore",
    "load_schedule",
    "minimise_schedule",
    "context_switches",
    "replay",
    "save_schedule",
]
