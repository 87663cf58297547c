"""A finding as the kernel would print it: the WARNING (or BUG) line, the
task's call trace in kernel function names, the other tasks' traces where
they stood, then the schedule as a step-by-step timeline."""

from __future__ import annotations

from memattr.explore import Finding, Scenario, replay
from memattr.explore_run import RunResult
from memattr.uapi import INVALID_GPA

_SOURCES = (
    ("kvm_gmem_", "virt/kvm/guest_memfd.c"),
    ("kvm_arch_", "arch/x86/kvm/mmu/mmu.c"),
    ("kvm_tdp_", "arch/x86/kvm/mmu/mmu.c"),
    ("lockdep_", "kernel/locking/lockdep.c"),
)
_NOT_KVM = ("vfs_", "__x64_sys", "do_syscall", "entry_SYSCALL", "__fput", "task_work", "syscall_exit",
            "mutex_", "_raw_", "down_", "up_", "RET_PF", "(not started)")


def _source(fn: str) -> str:
    for prefix, path in _SOURCES:
        if fn.startswith(prefix):
            return path
    return "virt/kvm/kvm_main.c"


def _frame(fn: str) -> str:
    return f" {fn}" if fn.startswith(_NOT_KVM) else f" {fn} [kvm]"


def _trace(frames: list[str]) -> list[str]:
    return ["Call Trace:", " <TASK>", *(_frame(f) for f in frames), " </TASK>"]


def _inval(inval: tuple[int, int, int, int]) -> str:
    seq, n, start, end = inval
    rng = "-" if start == INVALID_GPA else f"[{start:#x}, {end:#x})"
    return f"in_progress={n} seq={seq} range={rng}"


def splat(scenario: Scenario, run: RunResult) -> str:
    """The kernel-style report of a traced run that found a bug."""
    bug = run.bug
    if bug is None:
        return f"{scenario.name}: the schedule ran clean (no bug)"
    names = [a.name for a in scenario.actors]
    comm = {a.name: a.comm or a.name for a in scenario.actors}
    params = ", ".join(f"{k}={v}" for k, v in scenario.params.items())
    out: list[str] = []
    if bug.kind == "invariant" and bug.actor is not None:
        i = names.index(bug.actor)
        out += [
            "==================================================================",
            f"BUG: memattr invariant: {bug.message}",
            f"Model: {params} (memattr explore {scenario.name})",
            f"CPU: {i} PID: {1001 + i} Comm: {comm[bug.actor]}, in the step that broke it:",
            *_trace(list(run.bug_stack)),
        ]
    elif bug.actor is not None and bug.kind in ("WARNING", "KVM_BUG_ON", "lockdep", "exception"):
        i = names.index(bug.actor)
        frames = list(run.bug_stack)
        rip = bug.rip or (frames[0].split(" ")[0] if frames else "?")
        if not frames or frames[0].split(" ")[0] != rip:
            frames.insert(0, rip)
        what = {
            "WARNING": "",
            "KVM_BUG_ON": "" if bug.message.startswith("KVM_BUG_ON") else "KVM_BUG_ON: ",
            "lockdep": "lockdep_assert_held() failed: ",
            "exception": "unexpected exception: ",
        }[bug.kind]
        out += [
            "------------[ cut here ]------------",
            f"WARNING: CPU: {i} PID: {1001 + i} at {_source(rip)} {rip} [kvm]",
            f"{what}{bug.message}",
            f"Modules linked in: kvm (memattr model: {params})",
            f"CPU: {i} PID: {1001 + i} Comm: {comm[bug.actor]} (memattr explore {scenario.name})",
            f"RIP: 0010:{rip} [kvm]",
            *_trace(frames[1:] if len(frames) > 1 else frames),
            "---[ end trace 0000000000000000 ]---",
        ]
    else:
        out += [
            "==================================================================",
            f"BUG: memattr {bug.kind}: {bug.message}",
            f"Model: {params} (memattr explore {scenario.name})",
        ]
    others = [n for n in names if n != bug.actor]
    if others:
        out.append("")
        out.append("Other tasks, where the schedule left them:")
    for n in others:
        i = names.index(n)
        frames = run.stacks.get(n) or []
        state = run.outcomes.get(n, "")
        if frames == ["(not started)"]:
            frames, state = [], "not started"
        out.append(f"CPU: {i} PID: {1001 + i} Comm: {comm[n]}" + ("" if frames else f" ({state})"))
        if frames:
            out += _trace(frames)
    out.append("")
    out.append(f"Schedule ({len(run.choices)} steps; the VM's invalidation state after each):")
    width = max(len(n) for n in names)
    for e in run.timeline:
        out.append(f" {e.index:4d}  {e.actor:<{width}}  {e.step:<44} {_inval(e.inval)}")
    out.append("")
    out.append("Tasks: " + "; ".join(f"{n}: {run.outcomes[n]}" for n in names))
    return "\n".join(out)


def render(scenario: Scenario, finding: Finding) -> str:
    """Replays a finding's schedule with tracing and reports it."""
    return splat(scenario, replay(scenario, finding.schedule))


__all__ = ["render", "splat"]
