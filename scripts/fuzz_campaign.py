#!/usr/bin/env python3
"""A counted fuzzing campaign over memattr's parsers and entry points.

    python scripts/fuzz_campaign.py --n 500 --seed 1 [--rlimit-gib 4]

Each target runs in its own worker process (under RLIMIT_AS when asked), one
input at a time, each under a 20 s alarm. Counted per target:

- inputs: inputs tried;
- crashes: the worker died (signal, abort);
- hangs: an input ran past its alarm;
- wrong: a result that contradicts an oracle (a damaged text trace that
  parses into other operations, two stores or two engines disagreeing, a
  store differing from a per-page dict, state changed by a failing call);
- tracebacks: an exception outside the documented ones;
- accepted: inputs a target reports as accepted without counting them as
  wrong (none since binary format v2: a mutated binary trace that loads as
  a different valid trace, through the whole-file or the streaming reader,
  is counted as wrong, since v2's CRC-32s must refuse it).

Prints one line per target and a JSON summary.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import traceback
from typing import Any, Callable

TARGETS = ["binary", "text", "meta", "qemu", "stores", "vm", "cli"]


class Hang(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise Hang()


# --------------------------------------------------------------------------
# targets: each returns None (fine), "wrong:<why>", "accepted"; documented
# exceptions are caught inside; anything else propagates (a traceback).


def _setup() -> dict[str, Any]:
    from memattr import trace as t
    from memattr import workloads as w

    good = w.make("boot-and-churn", "1G")
    buf = io.BytesIO()
    t.write_binary(good, buf)
    return {"good": good, "bytes": buf.getvalue(), "text": list(t.iter_text_lines(good))}


def t_binary(rng: random.Random, env: dict[str, Any]) -> str | None:
    import tempfile

    import numpy as np

    from memattr import stream
    from memattr import trace as t
    from memattr.trace_binary import parse_binary

    data = bytearray(env["bytes"])
    for _ in range(rng.randint(1, 6)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    if rng.random() < 0.3:
        data = data[: rng.randrange(len(data) + 1)]
    good = env["good"]

    def differs(tr: t.Trace) -> bool:
        strip = lambda m: {k: v for k, v in m.items() if k != "phases"}  # noqa: E731
        return not (np.array_equal(tr.ops, good.ops) and strip(tr.meta) == strip(good.meta))

    wrong = []
    # The whole-file reader.
    try:
        tr = parse_binary(bytes(data))
        tr.validate()
        if differs(tr):
            wrong.append("whole")
    except t.TraceFormatError:
        pass
    # The streaming reader, every record read (one pass).
    with tempfile.NamedTemporaryFile(suffix=".trace") as f:
        f.write(bytes(data))
        f.flush()
        try:
            st = stream.open_trace(f.name)
            chunks = [ops for _, ops in st.chunks()]
            tr = t.Trace(np.concatenate(chunks) if chunks else t.empty_ops(), st.meta)
            if differs(tr):
                wrong.append("streaming")
        except t.TraceFormatError:
            pass
    return f"wrong:mutated binary trace loads as a different valid trace ({', '.join(wrong)})" if wrong else None


def t_text(rng: random.Random, env: dict[str, Any]) -> str | None:
    import numpy as np

    from memattr import trace as t

    lines = list(env["text"])
    how = rng.choice(["cut", "drop", "swap", "char", "arrow", "dup"])
    if how == "cut":
        lines = lines[: rng.randrange(1, len(lines))]
    elif how == "drop":
        del lines[rng.randrange(1, len(lines))]
    elif how == "swap":
        i, j = rng.randrange(2, len(lines) - 1), rng.randrange(2, len(lines) - 1)
        lines[i], lines[j] = lines[j], lines[i]
    elif how == "char":
        i = rng.randrange(1, len(lines))
        s = lines[i]
        k = rng.randrange(len(s))
        lines[i] = s[:k] + rng.choice("0123456789abcdefx =->#,") + s[k + 1 :]
    elif how == "arrow":
        lines.insert(rng.randrange(1, len(lines)), "-> " + str(rng.randint(-30, 30)))
    else:
        i = rng.randrange(2, len(lines) - 1)
        lines.insert(i, lines[i])
    try:
        tr = t.parse_text(lines)
    except t.TraceFormatError:
        return None
    if not np.array_equal(tr.ops, env["good"].ops):
        return f"wrong:text edit '{how}' parsed into other operations"
    return None


def _rand_json(rng: random.Random, depth: int = 0) -> Any:
    r = rng.random()
    if depth > 3 or r < 0.4:
        return rng.choice([None, True, False, 0, -1, 1 << 62, 1 << 64, 1.5, float("nan"), "", "6.8", "v11", "x"])
    if r < 0.7:
        return [_rand_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    keys = ["vm_type", "vm_kwargs", "regions", "phases", "params", "layout", "semantics", "attr_memory_limit",
            "guest_memfd_max_order", "lockdep", "guest", "x"]
    return {rng.choice(keys): _rand_json(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def t_meta(rng: random.Random, env: dict[str, Any]) -> str | None:
    from memattr import Vm
    from memattr import trace as t
    from memattr.errors import LockdepError
    from memattr.trace_binary import parse_binary

    good = env["good"]
    meta = dict(good.meta)
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(["vm_type", "vm_kwargs", "regions", "phases", "params", "layout"])
        if rng.random() < 0.5:
            meta[key] = _rand_json(rng)
        elif key == "phases":
            n = len(good)
            a, b = rng.choice([0, 1, -1, n, n + 1, 1 << 62]), rng.choice([0, n, n - 1, n + 5, 1 << 62, -3])
            meta[key] = [["p", a, b]] + ([["q", b, n]] if rng.random() < 0.5 else [])
        elif key == "vm_kwargs":
            meta[key] = {rng.choice(["semantics", "attr_memory_limit", "guest_memfd_max_order", "lockdep", "colour"]):
                         _rand_json(rng)}
    try:
        blob = json.dumps(meta).encode()
    except (ValueError, TypeError):
        return None
    import zlib

    from memattr.trace_binary import pack_header

    blob += b" " * ((-len(blob)) % 8)
    records = good.ops.tobytes()
    data = pack_header(blob, good.ops.size, zlib.crc32(records)) + blob + records
    try:
        tr = parse_binary(data)
    except t.TraceFormatError:
        return None
    # Accepted metadata must replay without an undocumented exception.
    vm = Vm(tr.vm_type, **tr.meta["vm_kwargs"]) if tr.vm_type in (0, 1) else None
    if vm is None:
        return None
    try:
        res = t.replay(tr, vm)
    except LockdepError:
        return None  # the v11 ordering, reported by the lock checker
    if res.ops != len(tr):
        return f"wrong:replayed {res.ops} operations of {len(tr)}"
    return None


def t_qemu(rng: random.Random, env: dict[str, Any]) -> str | None:
    from memattr import qemu
    from memattr import trace as t

    lines = []
    for _ in range(rng.randint(1, 8)):
        pre = rng.choice(["", "qemu-system-x86_64: warning: memory fault: GPA 0x4000 ", "1@2.3:", "garbage ",
                          "2024-01-31T16:17:21.1Z (7) "])
        ev = rng.choice([
            f"kvm_convert_memory start 0x{rng.getrandbits(rng.choice([12, 40, 64, 70])):x} "
            f"size 0x{rng.getrandbits(rng.choice([12, 21, 64])):x} {rng.choice(['shared_to_private', 'private_to_shared', 'sideways'])}",
            f"kvm_memory_fault start 0x{rng.getrandbits(40):x} size 0x1000 flags 0x{rng.getrandbits(4):x}",
            "kvm_convert_memory start nope",
            "".join(rng.choice("abc xyz_0123:") for _ in range(rng.randint(0, 40))),
        ])
        lines.append(pre + ev)
    strict = rng.random() < 0.3
    try:
        tr = qemu.parse_log(lines, strict=strict)
    except t.TraceFormatError:
        return None
    tr.validate()
    return None


def t_stores(rng: random.Random, env: dict[str, Any]) -> str | None:
    import memattr

    stores = [memattr.RangeTree(), memattr.XArray()]
    oracle: dict[int, int] = {}
    span = 1 << 12
    for _ in range(rng.randint(1, 12)):
        op = rng.choice(["set", "set", "reserve", "huge", "erase-huge", "bad"])
        a = rng.randrange(span)
        b = a + rng.randint(1, 300)
        v = rng.choice([0, 1, 8, 1 << 63])
        if op == "huge":
            a, b = rng.choice([(0, 1 << 33), (1 << 40, 1 << 62), (0, (1 << 64) - 1)])
        elif op == "erase-huge":
            a, b, v = 0, rng.choice([1 << 40, 1 << 63, (1 << 64) - 1]), 0
        elif op == "bad":
            a, b = rng.choice([(5, 5), (9, 3), (-1, 4), (0, 1 << 64)])
        outs = []
        for s in stores:
            before = (s.memory_bytes(), list(s.runs(0, span + 400)))
            try:
                if op == "reserve":
                    s.reserve(a, b, rng.choice([None, 0, 1 << 20]))
                    s.release_reservations()
                else:
                    s.set_range(a, b, v)
                outs.append("ok")
            except (ValueError, OverflowError, TypeError, MemoryError) as e:
                outs.append(type(e).__name__)
                if (s.memory_bytes(), list(s.runs(0, span + 400))) != before:
                    return f"wrong:{type(s).__name__} changed by a failing {op}"
        if op in ("set", "erase-huge") and outs[0] == "ok":
            for g in range(a, min(b, span + 400)):
                if v:
                    oracle[g] = v
                else:
                    oracle.pop(g, None)
        if op == "huge" and v != 0 and outs == ["ok", "ok"]:
            return "wrong:xarray accepted a set no host can hold"
        if op in ("set", "erase-huge", "bad") and outs[0] != outs[1]:
            return f"wrong:stores disagree on {op} ({outs})"
        if op == "huge" and outs[0] == "ok":
            for g in range(a, min(b, span + 400)):
                if v:
                    oracle[g] = v
                else:
                    oracle.pop(g, None)
            # The rangetree holds it; the per-page one refused: resync.
            stores[1] = memattr.XArray()
            for g, val in oracle.items():
                stores[1].set_range(g, g + 1, val)
            if b > span + 400:
                stores[0].set_range(span + 400, b, 0)
    for s in stores:
        for g in range(0, span + 400, 7):
            if s.get(g) != oracle.get(g, 0):
                return f"wrong:{type(s).__name__} get({g}) = {s.get(g)}, oracle {oracle.get(g, 0)}"
    return None


def t_vm(rng: random.Random, env: dict[str, Any]) -> str | None:
    from memattr import Vm
    from memattr.uapi import KVM_X86_SW_PROTECTED_VM

    vms = [Vm(KVM_X86_SW_PROTECTED_VM, store=s) for s in ("rangetree", "xarray")]
    for _ in range(rng.randint(1, 6)):
        address = rng.choice([0, 4096, 1 << 30, rng.getrandbits(64), (1 << 64) - 4096, 3])
        size = rng.choice([4096, 1 << 21, 1 << 30, 1 << 51, 1 << 63, 0, rng.getrandbits(64), 5])
        attributes = rng.choice([0, 8, 1, 1 << 63])
        flags = rng.choice([0, 0, 0, 1])
        outs = []
        for vm in vms:
            try:
                vm.set_memory_attributes(address, size, attributes, flags)
                outs.append(0)
            except OSError as e:
                outs.append(e.errno)
        if outs[0] != outs[1] and not (size < 1 << 51 and size > 1 << 32):
            return f"wrong:stores give {outs} for set({address:#x}, {size:#x}, {attributes:#x}, {flags})"
        if outs[0] != outs[1]:
            # Between 4 GiB and 2 PiB the per-page store may run out where
            # the rangetree does not (this host's memory): resync.
            vms[0].set_memory_attributes(address, size, 0, 0) if outs[0] == 0 else None
    if list(vms[0].store.runs(0, 1 << 20)) != list(vms[1].store.runs(0, 1 << 20)):
        return "wrong:stores' states differ"
    return None


def t_cli(rng: random.Random, env: dict[str, Any]) -> str | None:
    from memattr import cli

    opt = rng.choice(["--guest", "--turnover", "--seed", "--vcpus", "--shared-fraction", "--gmem-max-order",
                      "--sizes", "--time-budget", "--jobs"])
    value = rng.choice(["inf", "-inf", "nan", "1e9", "-1", "-1G", "0", "1e400", "0x10", "", "99999999999999P",
                        "1G,-2G", "abc", "1e-300", "3"])
    cmd = rng.choice(["generate", "compare-args"])
    if cmd == "generate" and opt in ("--sizes", "--time-budget", "--jobs"):
        cmd = "compare-args"
    argv = (["generate", "churn", "-o", os.devnull, "--guest", "1G", opt, value] if cmd == "generate"
            else ["compare", "--sizes", "1G", "--no-progress", "--no-plot", "--out", "/dev/null", opt, value])
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main(argv)
        except SystemExit as e:
            if e.code != 2:
                return f"wrong:exit {e.code} for {argv}"
    if "Traceback" in out.getvalue() + err.getvalue():
        return f"wrong:traceback printed for {argv}"
    return None


FUNCS: dict[str, Callable[[random.Random, dict[str, Any]], str | None]] = {
    "binary": t_binary, "text": t_text, "meta": t_meta, "qemu": t_qemu, "stores": t_stores, "vm": t_vm, "cli": t_cli,
}


def worker(target: str, seed: int, start: int, n: int) -> None:
    env = _setup()
    signal.signal(signal.SIGALRM, _alarm)
    for i in range(start, n):
        rng = random.Random(f"{seed}:{target}:{i}")
        print(f"I {i}", flush=True)
        signal.alarm(20)
        try:
            r = FUNCS[target](rng, env)
            signal.alarm(0)
            if r:
                print(f"R {i} {r}", flush=True)
        except Hang:
            print(f"H {i}", flush=True)
        except BaseException as e:  # noqa: BLE001 - the campaign counts them
            signal.alarm(0)
            tb = traceback.format_exception(e)[-1].strip()
            print(f"T {i} {type(e).__name__}: {tb[:200]}", flush=True)
    print("DONE", flush=True)


def campaign(n: int, seed: int, rlimit_gib: float | None, targets: list[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for target in targets:
        counts = {"inputs": 0, "crashes": 0, "hangs": 0, "wrong": 0, "tracebacks": 0, "accepted": 0}
        examples: list[str] = []
        start = 0
        while start < n:
            pre = []
            if rlimit_gib:
                lim = int(rlimit_gib * (1 << 30))
                pre = ["-c", f"import resource,sys,runpy; resource.setrlimit(resource.RLIMIT_AS, ({lim}, {lim})); "
                       f"sys.argv={[__file__, '--worker', target, '--seed', str(seed), '--start', str(start), '--n', str(n)]!r}; "
                       "runpy.run_path(sys.argv[0], run_name='__main__')"]
            else:
                pre = [__file__, "--worker", target, "--seed", str(seed), "--start", str(start), "--n", str(n)]
            p = subprocess.run([sys.executable, *pre], capture_output=True, text=True)
            last = start - 1
            done = False
            for line in p.stdout.splitlines():
                kind, _, rest = line.partition(" ")
                if kind == "I":
                    last = int(rest)
                    counts["inputs"] += 1
                elif kind == "H":
                    counts["hangs"] += 1
                    examples.append(f"hang at input {rest}")
                elif kind == "T":
                    counts["tracebacks"] += 1
                    examples.append(rest)
                elif kind == "R":
                    i, _, why = rest.partition(" ")
                    if why == "accepted":
                        counts["accepted"] += 1
                    else:
                        counts["wrong"] += 1
                        examples.append(f"input {i}: {why}")
                elif kind == "DONE":
                    done = True
            if done:
                break
            counts["crashes"] += 1
            examples.append(f"worker died (exit {p.returncode}) at input {last}: {p.stderr.strip()[-200:]}")
            start = last + 1
        summary[target] = {**counts, "examples": examples[:5]}
        print(f"{target:8s} " + " ".join(f"{k}={v}" for k, v in counts.items()), flush=True)
        for ex in examples[:3]:
            print(f"         {ex}")
    return summary


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300, help="inputs per target")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rlimit-gib", type=float, default=None, help="RLIMIT_AS for the workers")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--worker", default=None)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, a.seed, a.start, a.n)
        return 0
    s = campaign(a.n, a.seed, a.rlimit_gib, a.targets.split(","))
    total = {k: sum(v[k] for v in s.values()) for k in ("inputs", "crashes", "hangs", "wrong", "tracebacks", "accepted")}
    print("total    " + " ".join(f"{k}={v}" for k, v in total.items()))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"targets": s, "total": total, "n": a.n, "seed": a.seed, "rlimit_gib": a.rlimit_gib}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
