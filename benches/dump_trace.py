"""Dump a trace for the Rust replay harness (benches/replay.rs): setup lines, then raw ops."""
import sys, numpy as np
from memattr import trace_io
from memattr.trace_format import OP_CREATE_GUEST_MEMFD, OP_SET_USER_MEMORY_REGION
tr = trace_io.read(sys.argv[1]); out = sys.argv[2]
ops = tr.ops
i = 0
with open(out + ".setup", "w") as f:
    f.write(f"vm {tr.vm_type} {tr.meta.get('vm_kwargs', {}).get('guest_memfd_max_order', 18)}\n")
    while ops["kind"][i] in (OP_CREATE_GUEST_MEMFD, OP_SET_USER_MEMORY_REGION):
        o = ops[i]
        if o["kind"] == OP_CREATE_GUEST_MEMFD:
            f.write(f"gmem {o['size']} {o['arg']}\n")
        else:
            slot, uaddr, gmem = tr.meta["regions"][o["aux"]]
            f.write(f"slot {slot} {o['attributes']} {o['gpa']} {o['size']} {uaddr} {o['arg']}\n")
        i += 1
rest = ops[i:]
assert not np.isin(rest["kind"], [2, 3, 5]).any()
np.ascontiguousarray(rest).tofile(out + ".ops")
print(i, len(rest))
