"""Dumps a trace for the pure-Rust replay harness (benches/replay.rs).

    .venv/bin/python benches/dump_trace.py TRACE.mtr /tmp/bac

writes ``/tmp/bac.setup`` (the VM type, guest_memfd order, and the trace's
leading guest_memfd and memslot operations, one per line),
``/tmp/bac.ops`` (the remaining records, raw OP_DTYPE bytes) and
``/tmp/bac.sets`` (the ranges the applied sets store, as
``memattr.sweep.run_store_only`` selects them: start, end, value per set,
three little-endian u64, for the harness's ``--store-only``). Only traces
whose setup comes first and whose remaining operations the native batch
runs (sets, faults, fallocates) can be dumped.
"""

from __future__ import annotations

import sys

import numpy as np

from memattr import trace_io
from memattr.replayer import _chunk_sets
from memattr.trace_format import (
    OP_CREATE_GUEST_MEMFD,
    OP_GUEST_MEMFD_CLOSE,
    OP_SET_USER_MEMORY_REGION,
)


def main(src: str, out: str) -> None:
    tr = trace_io.read(src)
    ops = tr.ops
    order = tr.meta.get("vm_kwargs", {}).get("guest_memfd_max_order", 18)
    i = 0
    with open(out + ".setup", "w") as f:
        f.write(f"vm {tr.vm_type} {order}\n")
        while i < len(ops) and ops["kind"][i] in (OP_CREATE_GUEST_MEMFD, OP_SET_USER_MEMORY_REGION):
            o = ops[i]
            if o["kind"] == OP_CREATE_GUEST_MEMFD:
                f.write(f"gmem {o['size']} {o['arg']}\n")
            else:
                slot, uaddr, _gmem = tr.meta["regions"][o["aux"]]
                f.write(f"slot {slot} {o['attributes']} {o['gpa']} {o['size']} {uaddr} {o['arg']}\n")
            i += 1
    rest = ops[i:]
    setup_kinds = [OP_CREATE_GUEST_MEMFD, OP_SET_USER_MEMORY_REGION, OP_GUEST_MEMFD_CLOSE]
    if np.isin(rest["kind"], setup_kinds).any():
        sys.exit(f"{src}: guest_memfd or memslot operations after the first set; cannot dump")
    np.ascontiguousarray(rest).tofile(out + ".ops")
    starts, ends, values = _chunk_sets(ops, 0)
    np.stack([starts, ends, values], axis=1).astype("<u8").tofile(out + ".sets")
    print(f"{i} setup operations, {len(rest)} batch operations, {starts.size} applied sets")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
