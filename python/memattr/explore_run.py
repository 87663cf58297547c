"""One run of a scenario under one schedule: actor threads gated by a
scheduler, so that exactly one runs at a time and each switch happens at a
scheduling point of the driver (:mod:`memattr.sched`).

Each actor is a real thread calling the ordinary Vm API. At a point the
actor records what it is about to do (its pending step) and parks; the
scheduler asks the chooser which enabled actor runs next and lets exactly
that one go until its next point. An actor waiting to take a lock that is
held is not enabled; a vCPU that retried a fault is not enabled again until
another actor has made a step (its re-fault would see the same state).

What the run detects, stopping at the first:

- the kernel's own checks as the core and the lock checker raise them: a
  WARN_ON_ONCE (``memattr.locks.KvmWarning``), KVM_BUG_ON
  (``KvmBugError``), a lockdep assertion (``LockdepError``);
- at the end: ``mmu_invalidate_in_progress`` not back to zero; a deadlock
  (every live actor waits for a lock) or a livelock (a fault retries and
  nothing else can run);
- model invariants, checked at every scheduling decision, against the
  attribute store (not against the core's rules): no huge leaf maps memory
  whose attributes are mixed; every leaf a fault installed still matches the
  private-ness that fault checked.
"""

from __future__ import annotations

import sys
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from memattr import sched
from memattr.errors import KvmBugError, LockdepError
from memattr.explore_steps import (
    Footprint,
    footprint,
    kernel_stack,
    merge_frames,
    point_frame,
    step_text,
)
from memattr.locks import KvmWarning
from memattr.uapi import KVM_MEMORY_ATTRIBUTE_PRIVATE, PAGE_SHIFT
from memattr.vm import Vm

_P = KVM_MEMORY_ATTRIBUTE_PRIVATE
_LEVEL_PAGES = {1: 1, 2: 512, 3: 512 * 512}
_LEVEL_NAMES = {1: "4K", 2: "2M", 3: "1G"}
PARK_TIMEOUT = 30.0


class _Abort(BaseException):
    """Unwinds an actor when its run is over (not an Exception: the
    driver's ``except Exception`` clauses must not catch it)."""


@dataclass(frozen=True)
class Bug:
    """What a run found. ``kind``: "WARNING", "KVM_BUG_ON", "lockdep",
    "invariant", "in_progress", "deadlock", "livelock" or "exception".
    ``actor``: the task it fired in (None for end-of-run findings);
    ``rip``: the kernel function it fired in."""

    kind: str
    message: str
    actor: str | None = None
    rip: str = ""

    @property
    def signature(self) -> tuple[str, str, str | None]:
        """What makes two findings the same bug."""
        return (self.kind, self.rip or self.message.split(":")[0], self.actor)


@dataclass
class Decision:
    """A scheduling decision: who may run, and what each would do."""

    index: int
    enabled: list[str]
    last: str | None
    pending: dict[str, Footprint]


@dataclass
class TimelineEntry:
    index: int
    actor: str
    step: str
    inval: tuple[int, int, int, int]


@dataclass
class RunResult:
    choices: list[str]
    bug: Bug | None
    completed: bool  # every actor finished (or the run stopped at a bug)
    pruned: bool  # the chooser gave up (nothing left to explore from here)
    states: list[int]
    outcomes: dict[str, str]
    timeline: list[TimelineEntry] = field(default_factory=list)
    # kernel frames of each actor where it was parked when the run ended
    stacks: dict[str, list[str]] = field(default_factory=dict)
    bug_stack: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Actor:
    """A concurrent task: ``fn(vm)`` or ``fn(vm, env)`` over the Vm the
    scenario's setup built, using the ordinary Vm API. ``comm`` is the task
    name in reports (default: ``name``)."""

    name: str
    fn: Callable[..., Any]
    comm: str | None = None


class _ActorState:
    __slots__ = (
        "actor", "index", "go", "pending", "done", "own_steps", "retry_mark",
        "outcome", "error", "stack", "nargs", "held",
    )

    def __init__(self, actor: Actor, index: int, nargs: int) -> None:
        self.actor = actor
        self.index = index
        self.go = threading.Semaphore(0)
        self.pending: tuple[str, object] = (sched.STEP, "start")
        self.done = False
        self.own_steps = 0
        self.retry_mark = -1
        self.outcome = "not run"
        self.error: BaseException | None = None
        self.stack: list[str] = []
        self.nargs = nargs
        # The locks this actor holds, as the scheduler saw it take them.
        self.held: list[object] = []


class ScheduleMismatch(RuntimeError):
    """A replayed schedule named an actor that could not run there (the
    schedule is not this scenario's, or the run is not deterministic)."""


Chooser = Callable[[Decision], "str | None"]


def _nargs(fn: Callable[..., Any]) -> int:
    import inspect

    try:
        params = [
            p for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
        ]
    except (TypeError, ValueError):
        return 1
    return 2 if len(params) >= 2 else 1


def check_invariants(vm: Vm, mapped: dict[tuple[int, int, int], bool]) -> str | None:
    """The model's invariants over the TDP mappings, against the store:
    None, or what is wrong. ``mapped``: (as_id, leaf start gfn, level) ->
    the private-ness the fault that installed the leaf checked."""
    for level in (2, 3):
        n = _LEVEL_PAGES[level]
        for as_id in range(vm.nr_memslot_as_ids):
            for s, e in vm.mmu.mappings(level, as_id=as_id):
                for leaf in range(s, e, n):
                    private = vm.get_memory_attributes(leaf) & _P
                    if not vm.range_has_attributes(leaf, leaf + n, private, _P):
                        return (
                            f"huge mapping over mixed memory: {_LEVEL_NAMES[level]} leaf "
                            f"[{leaf:#x}, {leaf + n:#x}) maps gfns that are private and gfns that "
                            f"are shared"
                        )
    for (as_id, leaf, level), private in mapped.items():
        if vm.mmu.mapped_level(leaf << PAGE_SHIFT, as_id=as_id) != level:
            continue  # zapped (or replaced) since
        n = _LEVEL_PAGES[level]
        want = _P if private else 0
        if not vm.range_has_attributes(leaf, leaf + n, want, _P):
            return (
                f"TDP mapping over a gfn whose attributes changed after the fault checked "
                f"them: {_LEVEL_NAMES[level]} leaf [{leaf:#x}, {leaf + n:#x}) was mapped by a "
                f"{'private' if private else 'shared'} fault, the memory is now "
                f"{'shared' if private else 'private'} (at least in part)"
            )
    return None


def _rip_of_warning(text: str) -> str:
    name = text.split("(", 1)[0].strip().split()[-1] if "(" in text else ""
    if name and not name.startswith("kvm_"):
        name = "kvm_" + name
    return name


class Execution:
    """Runs ``actors`` over the Vm ``setup()`` builds, asking ``choose`` at
    each decision which enabled actor goes next (None: stop here, the
    schedule is not worth finishing). ``trace``: record kernel call stacks
    and a timeline (slower; for reports)."""

    def __init__(
        self,
        setup: Callable[[], Any],
        actors: Sequence[Actor],
        choose: Chooser,
        *,
        trace: bool = False,
        fingerprints: bool = True,
        max_steps: int = 4000,
    ) -> None:
        self.setup = setup
        self.actors = list(actors)
        self.choose = choose
        self.trace = trace
        self.fingerprints = fingerprints
        self.max_steps = max_steps
        self._by_ident: dict[int, _ActorState] = {}
        self._parked = threading.Semaphore(0)
        self._aborting = False
        self._bug: Bug | None = None
        self._bug_stack: list[str] = []
        self._running: _ActorState | None = None
        self._mapped: dict[tuple[int, int, int], bool] = {}
        self.vm: Vm | None = None

    # --- called in actor threads -------------------------------------------------------

    def _point(self, kind: str, what: object) -> None:
        st = self._by_ident.get(threading.get_ident())
        if st is None:
            return
        if kind == sched.MAPPED:
            assert isinstance(what, tuple)
            as_id: int
            gpa: int
            private: bool
            level: int
            as_id, gpa, private, level = what
            leaf = (gpa >> PAGE_SHIFT) & ~(_LEVEL_PAGES[level] - 1)
            self._mapped[(as_id, leaf, level)] = bool(private)
            return
        if self._aborting:
            raise _Abort
        st.pending = (kind, what)
        if self.trace:
            st.stack = kernel_stack(sys._getframe(1))
        self._parked.release()
        st.go.acquire()
        if self._aborting:
            raise _Abort

    def _body(self, st: _ActorState, vm: Vm, env: dict[str, Any]) -> None:
        self._by_ident[threading.get_ident()] = st
        self._parked.release()
        st.go.acquire()
        try:
            if self._aborting:
                raise _Abort
            value = st.actor.fn(vm, env) if st.nargs == 2 else st.actor.fn(vm)
            st.outcome = "returned" if value is None else f"returned {value!r}"
        except _Abort:
            st.outcome = "stopped (the run ended)"
        except OSError as e:
            # The kernel's answer (EBADF, KVM_EXIT_MEMORY_FAULT...), not a bug.
            st.outcome = f"{type(e).__name__}: {e}"
        except BaseException as e:  # noqa: BLE001 - every failure is reported
            st.outcome = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            st.error = e
            if self.trace:
                tb = e.__traceback__
                while tb is not None and tb.tb_next is not None:
                    tb = tb.tb_next
                self._bug_stack = kernel_stack(tb.tb_frame) if tb is not None else []
        finally:
            st.done = True
            self._parked.release()

    def _on_warning(self, message: Warning | str, category: type[Warning], *args: object, **kw: object) -> None:
        if not issubclass(category, KvmWarning):
            return
        st = self._by_ident.get(threading.get_ident())
        text = str(message)
        if self._bug is None:
            self._bug = Bug("WARNING", text, st.actor.name if st else None, _rip_of_warning(text))
            if self.trace:
                frames = kernel_stack(sys._getframe(1))
                self._bug_stack = merge_frames(point_frame(*st.pending), frames) if st else frames

    # --- the scheduler -------------------------------------------------------------------

    def _enabled(self, st: _ActorState, total: int) -> bool:
        kind, what = st.pending
        if kind == sched.ACQUIRE:
            return not what.locked()  # type: ignore[attr-defined]
        if kind == sched.RETRY:
            return total - st.own_steps != st.retry_mark
        return True

    def _fingerprint(self, vm: Vm, states: list[_ActorState]) -> int:
        kvm = vm._kvm
        maps = tuple(tuple(kvm.mappings(0, level)) for level in (1, 2, 3))
        runs = tuple(vm.store.runs(0, 1 << 40))
        actors = tuple(
            (st.done, st.own_steps, st.pending[0], str(getattr(st.pending[1], "name", st.pending[1])))
            for st in states
        )
        return hash((kvm.inval, maps, runs, kvm.memslot_generation, actors))

    def _classify(self, st: _ActorState) -> Bug | None:
        e = st.error
        if e is None:
            return None
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, KvmBugError):
            return Bug("KVM_BUG_ON", first, st.actor.name, "kvm_mmu_invalidate_end" if "invalidate_end" in first else "")
        if isinstance(e, LockdepError):
            # lockdep_assert_held() WARNs in the function that asserts.
            return Bug("lockdep", f"{e.rule}", st.actor.name)
        return Bug("exception", f"{type(e).__name__}: {first}", st.actor.name)

    def run(self) -> RunResult:
        if sched.hook is not None:
            raise RuntimeError("an exploration is already running in this process")
        built = self.setup()
        vm, env = (built if isinstance(built, tuple) else (built, {}))
        self.vm = vm
        states = [_ActorState(a, i, _nargs(a.fn)) for i, a in enumerate(self.actors)]
        by_name = {st.actor.name: st for st in states}
        threads = []
        choices: list[str] = []
        fps: list[int] = []
        timeline: list[TimelineEntry] = []
        stacks: dict[str, list[str]] = {}
        pruned = False
        total = 0
        sched.set_hook(self._point)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.showwarning = self._on_warning
                for st in states:
                    t = threading.Thread(
                        target=self._body, args=(st, vm, env), name=f"explore-{st.actor.name}", daemon=True
                    )
                    t.start()
                    threads.append(t)
                    self._wait_parked(st)
                last: str | None = None
                last_step_fn = ""
                last_frames: list[str] = []
                while self._bug is None:
                    live = [st for st in states if not st.done]
                    if not live:
                        break
                    enabled = [st.actor.name for st in live if self._enabled(st, total)]
                    if not enabled:
                        self._bug = self._stuck(vm, live)
                        break
                    problem = check_invariants(vm, self._mapped)
                    if problem is not None:
                        # Checked at every decision: the last step broke it.
                        self._bug = Bug("invariant", problem, last, last_step_fn)
                        self._bug_stack = last_frames
                        break
                    if self.fingerprints:
                        fps.append(self._fingerprint(vm, states))
                    decision = Decision(
                        len(choices),
                        enabled,
                        last if last is not None and not by_name[last].done else None,
                        {st.actor.name: self._footprint(st) for st in live},
                    )
                    name = self.choose(decision)
                    if name is None:
                        pruned = True
                        break
                    if name not in enabled:
                        raise ScheduleMismatch(
                            f"decision {len(choices)}: {name!r} cannot run (enabled: {enabled})"
                        )
                    st = by_name[name]
                    choices.append(name)
                    if st.pending[0] == sched.RETRY:
                        st.retry_mark = total - st.own_steps
                    step = step_text(*st.pending)
                    last_step_fn = point_frame(*st.pending).split(" ")[0]
                    if self.trace:
                        last_frames = merge_frames(point_frame(*st.pending), st.stack)
                    st.own_steps += 1
                    total += 1
                    self._running = st
                    kind, what = st.pending
                    st.go.release()
                    self._wait_parked(st)
                    self._running = None
                    if kind == sched.ACQUIRE:
                        st.held.append(what)
                    elif kind == sched.RELEASE and what in st.held:
                        st.held.remove(what)
                    last = name
                    if self.trace:
                        timeline.append(TimelineEntry(len(choices), name, step, vm._kvm.inval))
                    if self._bug is None and st.done:
                        self._bug = self._classify(st)
                    if total >= self.max_steps and self._bug is None:
                        self._bug = Bug("livelock", f"no end after {total} steps")
                if self._bug is None and not pruned:
                    self._bug = self._at_end(vm)
                stacks = self._stacks(states) if self.trace else {}
        finally:
            self._aborting = True
            for st in states:
                if not st.done:
                    st.go.release()
            for t in threads:
                t.join(timeout=10)
            sched.set_hook(None)
        return RunResult(
            choices=choices,
            bug=self._bug,
            completed=not pruned,
            pruned=pruned,
            states=fps,
            outcomes={st.actor.name: st.outcome for st in states},
            timeline=timeline,
            stacks=stacks,
            bug_stack=self._bug_stack,
        )

    @staticmethod
    def _footprint(st: _ActorState) -> Footprint:
        kind, what = st.pending
        others = kind == sched.RELEASE and any(lock is not what for lock in st.held)
        return footprint(kind, what, others)

    def _wait_parked(self, st: _ActorState) -> None:
        # An actor that never reaches its next point is blocked somewhere
        # the scheduler cannot see (a path without scheduling points that
        # waits for a lock another actor holds): say so instead of hanging.
        if not self._parked.acquire(timeout=PARK_TIMEOUT):
            raise RuntimeError(
                f"actor {st.actor.name!r} did not reach a scheduling point within "
                f"{PARK_TIMEOUT:g} s after {step_text(*st.pending)!r}: it is blocked outside "
                f"the explorer's control"
            )

    @staticmethod
    def _stacks(states: list[_ActorState]) -> dict[str, list[str]]:
        """Each live actor's kernel frames where it is parked."""
        stacks: dict[str, list[str]] = {}
        for st in states:
            if st.done:
                stacks[st.actor.name] = []
            elif st.own_steps == 0:
                stacks[st.actor.name] = ["(not started)"]
            else:
                stacks[st.actor.name] = merge_frames(point_frame(*st.pending), st.stack)
        return stacks

    def _stuck(self, vm: Vm, live: list[_ActorState]) -> Bug:
        names = ", ".join(st.actor.name for st in live)
        if all(st.pending[0] == sched.RETRY for st in live):
            return Bug(
                "livelock",
                f"a fault retries forever ({names}): mmu_invalidate_in_progress is "
                f"{vm.mmu_invalidate_in_progress} and nothing else can run",
                live[0].actor.name,
                "kvm_tdp_mmu_page_fault",
            )
        waits = "; ".join(
            f"{st.actor.name} waits for {getattr(st.pending[1], 'name', st.pending[1])}"
            for st in live if st.pending[0] == sched.ACQUIRE
        )
        return Bug("deadlock", f"no actor can run: {waits or names}")

    def _at_end(self, vm: Vm) -> Bug | None:
        problem = check_invariants(vm, self._mapped)
        if problem is not None:
            return Bug("invariant", problem)
        n = vm.mmu_invalidate_in_progress
        if n != 0:
            return Bug(
                "in_progress",
                f"mmu_invalidate_in_progress is {n} after every task finished, not 0: faults on "
                f"the invalidated range would retry forever",
            )
        return None


def replay_chooser(choices: Sequence[str], tolerant: bool = False) -> Chooser:
    """A chooser that follows ``choices``; past their end it keeps running
    the last actor while it can (else the first enabled). ``tolerant``: an
    actor that cannot run where listed is skipped instead of an error."""

    def choose(d: Decision) -> str | None:
        if d.index < len(choices):
            want = choices[d.index]
            if want in d.enabled or not tolerant:
                return want
        if d.last is not None and d.last in d.enabled:
            return d.last
        return d.enabled[0]

    return choose


__all__ = [
    "Actor",
    "Bug",
    "Decision",
    "Execution",
    "RunResult",
    "ScheduleMismatch",
    "TimelineEntry",
    "check_invariants",
    "replay_chooser",
]
