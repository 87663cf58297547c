"""Scheduling points: where the interleaving explorer may switch threads.

The driver (memattr.vm, locks, gfn_range, mmu, driven) calls ``hook`` at
each kernel step boundary — before a lock is taken or dropped, before each
on_lock / handler / on_unlock, before each half of a split read-modify-write
of the invalidation counters — when it is not None::

    if sched.hook is not None:
        sched.hook(KIND, what)

``hook`` is None unless :mod:`memattr.explore` is running actors, so the
normal path pays one global lookup per point and nothing else. The explorer
installs a function that parks the calling actor thread until the
scheduler picks it; threads that are not actors return at once.

Kinds: ``ACQUIRE`` / ``RELEASE`` (``what`` is the lock object, which has a
``name``), ``STEP`` (``what`` is the step's label: the kernel function, with
``:read`` / ``:write`` for a split read-modify-write), ``RETRY`` (a vCPU
goes back to the guest after RET_PF_RETRY and will fault again). ``MAPPED``
is a notice, not a switch: a fault installed ``what`` = (as_id, gpa,
private, level), for the explorer's invariants.
"""

from __future__ import annotations

from collections.abc import Callable

ACQUIRE = "acquire"
RELEASE = "release"
STEP = "step"
RETRY = "retry"
MAPPED = "mapped"

hook: Callable[[str, object], None] | None = None


def set_hook(fn: Callable[[str, object], None] | None) -> None:
    """Sets (or, with None, clears) the scheduler hook, and tells the core:
    while a hook is set, no KVM_SET_MEMORY_ATTRIBUTES runs whole natively,
    so every step reaches the hook."""
    global hook
    from memattr import _native

    hook = fn
    _native.set_sched_hooked(fn is not None)


__all__ = ["ACQUIRE", "MAPPED", "RELEASE", "RETRY", "STEP", "hook", "set_hook"]
