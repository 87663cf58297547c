"""The interleaving explorer (memattr.explore): it finds the seed's race
without being told the schedule, finds nothing under correct semantics,
replays saved schedules exactly, is deterministic, and its partial-order
reduction cuts schedules without losing bugs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memattr import KVM_MEMORY_ATTRIBUTE_PRIVATE as P
from memattr import KVM_X86_SW_PROTECTED_VM, Vm, sched
from memattr.cli import main
from memattr.explore import (
    Actor,
    Scenario,
    ScheduleMismatch,
    explore,
    load_schedule,
    replay,
    save_schedule,
)
from memattr.explore_report import render
from memattr.explore_run import check_invariants
from memattr.explore_scenarios import build, fault_conversion, gmem_vm, seed, straddle


def correct_semantics() -> list[str]:
    """The merged kernels' semantics this Vm knows (6.8, and later ones
    where modelled)."""
    out = []
    for s in ("6.8", "6.18"):
        try:
            Vm(KVM_X86_SW_PROTECTED_VM, semantics=s)  # type: ignore[arg-type]
        except ValueError:
            continue
        out.append(s)
    return out


def kinds(result: object) -> set[str]:
    return {f.bug.kind for f in result.findings}  # type: ignore[attr-defined]


def test_the_seed_warn_is_found_within_the_bound() -> None:
    sc = seed()  # v11, lock checker off, as the seed's production kernel
    res = explore(sc, bound=2)
    assert res.exhaustive and res.schedules > 0
    warns = [f for f in res.findings if f.bug.kind == "WARNING"]
    assert len(warns) == 1
    warn = warns[0]
    assert warn.bug.actor == "punch_hole"
    assert warn.bug.rip == "kvm_mmu_invalidate_range_add"
    # The lost update also leaves the count wrong: KVM_BUG_ON or a count
    # stuck above zero, depending on the schedule.
    assert {"KVM_BUG_ON", "in_progress"} <= kinds(res)
    text = render(sc, warn)
    assert "WARNING: CPU: 1 PID: 1002 at virt/kvm/kvm_main.c kvm_mmu_invalidate_range_add" in text
    trace = text[text.index("Call Trace:"): text.index("</TASK>")]
    # The seed's call trace, in its order.
    names = ["kvm_mmu_unmap_gfn_range", "kvm_gmem_invalidate_begin", "kvm_gmem_fallocate",
             "vfs_fallocate", "__x64_sys_fallocate", "entry_SYSCALL_64_after_hwframe"]
    positions = [trace.index(n) for n in names]
    assert positions == sorted(positions)
    # The set task was caught between the halves of its in_progress--.
    assert "kvm_mmu_invalidate_end (read)" in text and "kvm_mmu_invalidate_end (write)" in text


def test_the_lock_checker_catches_v11_in_one_thread() -> None:
    res = explore(seed(lockdep=True), bound=0)
    assert "lockdep" in kinds(res)
    (f,) = [f for f in res.findings if f.bug.kind == "lockdep"]
    assert f.switches == 0 or f.bug.actor == "set_attributes"


@pytest.mark.parametrize("semantics", correct_semantics())
@pytest.mark.parametrize("make", [seed, fault_conversion], ids=["seed", "fault-conversion"])
def test_correct_semantics_explore_clean(make: object, semantics: str) -> None:
    res = explore(make(semantics=semantics, lockdep=False), bound=2)  # type: ignore[operator]
    assert res.exhaustive and res.schedules > 10
    assert res.findings == []
    # With the lock checker on, nothing either (no false lockdep reports).
    res = explore(make(semantics=semantics, lockdep=True), bound=1)  # type: ignore[operator]
    assert res.findings == []


def test_straddle_race_found_with_the_fix_off_only() -> None:
    res = explore(straddle(fix=False), bound=2)
    assert kinds(res) == {"invariant"}
    assert all("huge mapping over mixed memory" in f.bug.message for f in res.findings)
    # The fault maps 2M after the store, or before it and the store then
    # mixes the leaf's memory: both are the race.
    (f,) = [f for f in res.findings if f.bug.actor == "fault"]
    text = render(straddle(fix=False), f)
    assert "BUG: memattr invariant" in text and "kvm_tdp_mmu_map" in text
    for semantics in correct_semantics():
        fixed = explore(straddle(semantics=semantics, fix=True), bound=2)
        assert fixed.exhaustive and fixed.findings == []


def test_a_saved_schedule_replays_exactly(tmp_path: Path) -> None:
    sc = seed()
    res = explore(sc, bound=2)
    (warn,) = [f for f in res.findings if f.bug.kind == "WARNING"]
    path = tmp_path / "seed.json"
    save_schedule(str(path), sc, warn)
    name, params, choices, bug = load_schedule(str(path))
    assert (name, choices) == ("seed", warn.schedule)
    again = replay(build(name, **params), choices)
    assert again.bug == warn.bug and again.choices == warn.schedule
    first = replay(sc, choices)
    assert [(e.actor, e.step, e.inval) for e in first.timeline] == [
        (e.actor, e.step, e.inval) for e in again.timeline
    ]
    # A schedule that does not fit the scenario is refused, not bent.
    with pytest.raises(ScheduleMismatch):
        replay(sc, ["nobody"])


def test_exploration_is_deterministic() -> None:
    a = explore(seed(), bound=1, random_schedules=15, seed=7)
    b = explore(seed(), bound=1, random_schedules=15, seed=7)
    assert (a.schedules, a.pruned, a.random_schedules, a.states) == (
        b.schedules, b.pruned, b.random_schedules, b.states
    )
    assert [(f.bug, f.schedule) for f in a.findings] == [(f.bug, f.schedule) for f in b.findings]


def test_por_cuts_schedules_and_keeps_the_bugs() -> None:
    with_por = explore(seed(), bound=2, por=True)
    without = explore(seed(), bound=2, por=False)
    assert with_por.pruned > 0 and without.pruned == 0
    assert with_por.schedules < without.schedules
    assert kinds(with_por) == kinds(without) and "WARNING" in kinds(with_por)


def test_budget_and_stop_at_first() -> None:
    res = explore(seed(), bound=3, budget=0.0)
    assert not res.exhaustive and res.schedules == 1
    res = explore(seed(), bound=2, stop_at_first=True, minimise=False)
    assert len(res.findings) == 1 and not res.exhaustive


def test_random_schedules_find_the_race_too() -> None:
    res = explore(seed(), bound=0, random_schedules=300, seed=1, stop_at_first=True)
    assert res.findings and res.random_schedules > 0


def test_user_scenario_a_careless_invalidation_source() -> None:
    """The Python API: actors are functions over a Vm. A home-made
    invalidation that forgets mmu_lock races the set path like v11."""

    def setup() -> object:
        return gmem_vm("6.8", lockdep=False)

    def careless(vm: Vm) -> None:
        vm.kvm_mmu_invalidate_begin()  # no mmu_lock: lockdep is off
        vm.kvm_mmu_invalidate_range_add(0x100, 0x110)
        vm.kvm_mmu_invalidate_end()

    def convert(vm: Vm, env: dict[str, int]) -> None:
        vm.set_memory_attributes(0, 16 << 12, P)

    sc = Scenario("careless", setup, [Actor("careless", careless), Actor("set", convert)])
    res = explore(sc, bound=2)
    assert kinds(res) & {"WARNING", "KVM_BUG_ON", "in_progress"}
    assert sched.hook is None  # the explorer leaves nothing behind


def test_a_fault_that_can_never_finish_is_a_livelock() -> None:
    def stuck(vm: Vm) -> None:
        with vm.mmu_lock:
            vm.kvm_mmu_invalidate_begin()
            vm.kvm_mmu_invalidate_range_add(0, 512)

    sc = Scenario(
        "stuck",
        lambda: gmem_vm("6.8", lockdep=True),
        [Actor("stuck", stuck), Actor("fault", lambda vm: vm.fault(8 << 12))],
    )
    res = explore(sc, bound=1)
    assert "livelock" in kinds(res)
    (f,) = [f for f in res.findings if f.bug.kind == "livelock"]
    assert f.bug.actor == "fault" and "in_progress is 1" in f.bug.message


def test_memslot_and_guest_memfd_actors_explore_clean() -> None:
    for name in ("memslots", "gmem-close"):
        res = explore(build(name), bound=1)
        assert res.exhaustive and res.findings == [], name


def test_the_invariants_can_fail() -> None:
    """The model invariants are checked against the store: a leaf whose
    memory changed behind the MMU's back is reported."""
    vm, _ = gmem_vm("6.8", lockdep=True)
    assert vm.fault(0x100 << 12) == 2
    assert check_invariants(vm, {(0, 0, 2): False}) is None
    vm.store.set_range(0x10, 0x20, P)  # behind the core's back: no zap
    msg = check_invariants(vm, {})
    assert msg is not None and "huge mapping over mixed memory" in msg
    vm2, _ = gmem_vm("6.8", lockdep=True)
    vm2.mmu.host_mapping_level = 1
    assert vm2.fault(0x5 << 12) == 1
    vm2.store.set_range(0x5, 0x6, P)
    msg = check_invariants(vm2, {(0, 0x5, 1): False})
    assert msg is not None and "attributes changed after the fault checked them" in msg


def test_normal_calls_after_exploring_take_the_native_path() -> None:
    explore(fault_conversion(), bound=0)
    vm, _ = gmem_vm("6.8", lockdep=True)
    assert sched.hook is None
    vm.set_memory_attributes(0, 1 << 12, P)
    assert vm.fault(0, private=True) == 1 and vm.fault(0x300 << 12) == 2
    assert vm.stats.set_calls == 1 and vm.mmu_invalidate_in_progress == 0


def test_cli_explore_and_replay(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "res"
    assert main(["explore", "seed", "--out", str(out)]) == 1
    text = capsys.readouterr().out
    assert "FOUND WARNING" in text and "------------[ cut here ]------------" in text
    saved = out / "explore-seed-warning.json"
    doc = json.loads(saved.read_text())
    assert doc["scenario"] == "seed" and doc["params"]["semantics"] == "v11"
    assert main(["explore", "--replay", str(saved)]) == 1
    text = capsys.readouterr().out
    assert "kvm_gmem_invalidate_begin" in text and "the same WARNING" in text
    assert main(["explore", "seed", "--semantics", "6.8", "--no-save"]) == 0
    assert "no bug found" in capsys.readouterr().out
    # Bad input: a clear message and status 2.
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert main(["explore", "--replay", str(bad)]) == 2
    doc["schedule"] = [["punch_hole", 3], ["nobody", 1]]
    bad.write_text(json.dumps(doc))
    assert main(["explore", "--replay", str(bad)]) == 2
    assert main(["explore", "nosuch"]) == 2
    assert main(["explore", "seed", "--fix"]) == 2
    assert main(["explore", "--list"]) == 0


def test_an_abba_lock_order_is_a_deadlock() -> None:
    """Locks lockdep's nesting rule does not cover (a guest_memfd's
    invalidation lock against slots_lock) taken in opposite orders."""
    from memattr.driven import filemap_invalidate_lock

    def punch_under_invalidate_lock(vm: Vm, env: dict[str, int]) -> None:
        with filemap_invalidate_lock(vm, env["fd"]):
            vm.set_memory_attributes(0, 16 << 12, P)  # takes slots_lock

    def close(vm: Vm, env: dict[str, int]) -> None:
        vm.guest_memfd_close(env["fd"])  # slots_lock, then the invalidation lock

    sc = Scenario(
        "abba",
        lambda: gmem_vm("6.8", lockdep=True),
        [Actor("a", punch_under_invalidate_lock), Actor("b", close)],
    )
    res = explore(sc, bound=1)
    assert kinds(res) == {"deadlock"}
    (f,) = res.findings
    assert "a waits for slots_lock" in f.bug.message
    assert "b waits for guest_memfd#0->invalidate_lock" in f.bug.message


def test_both_stores_explore_alike() -> None:
    """The per-page store and the range tree give the same runs, so the
    same schedules, states and findings."""
    a = explore(straddle(store="rangetree"), bound=2, minimise=False)
    b = explore(straddle(store="xarray"), bound=2, minimise=False)
    assert (a.schedules, a.pruned, a.states) == (b.schedules, b.pruned, b.states)
    assert [(f.bug, f.schedule) for f in a.findings] == [(f.bug, f.schedule) for f in b.findings]


def test_driven_operations_match_the_native_ones() -> None:
    """Under the explorer the guest_memfd, memslot, fault and set operations
    run step by step (memattr.driven, the fault's retry loop); alone, they
    must end in the same state with the same counters as the whole native
    operations."""
    from memattr.explore_scenarios import PUNCH

    def ops(vm: Vm, env: dict[str, int]) -> None:
        vm.set_user_memory_region(1, 0x400000, 0x200000)
        assert vm.fault(0x100 << 12) == 2 and vm.fault(0x401 << 12) == 2
        vm.set_memory_attributes(0x10 << 12, 16 << 12, P)
        assert vm.fault(0x10 << 12, private=True) == 1
        vm.guest_memfd_fallocate(env["fd"], PUNCH, 0, 32 << 12)
        vm.set_user_memory_region(1, 0x400000, 0x200000, flags=1)  # dirty logging on
        vm.set_user_memory_region(1, 0x600000, 0x200000, flags=1)  # move
        vm.set_user_memory_region(1, 0, 0)  # delete
        vm.guest_memfd_close(env["fd"])
        with pytest.raises(OSError):
            vm.guest_memfd_close(env["fd"])

    def state(vm: Vm) -> tuple[object, ...]:
        return (
            vm.stats, [vm.mmu.mappings(level) for level in (1, 2, 3)],
            list(vm.store.runs(0, 1 << 30)), vm.mmu.mixed_runs(0, 2),
            (vm.mmu_invalidate_seq, vm.mmu_invalidate_in_progress),
        )

    native_vm, env = gmem_vm("6.8", lockdep=True)
    ops(native_vm, env)
    captured: list[Vm] = []

    def setup() -> tuple[Vm, dict[str, int]]:
        vm, env = gmem_vm("6.8", lockdep=True)
        captured.append(vm)
        return vm, env

    res = explore(Scenario("alone", setup, [Actor("ops", ops)]), bound=0)
    assert res.schedules == 1 and res.findings == []
    assert state(captured[0]) == state(native_vm)
