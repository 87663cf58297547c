"""Instructions per operation of the native replay: a count, not a timing.

Times on a shared machine move with the neighbours' load (the same build's
best 1 TiB replay has ranged from 283 to 420 ns/op between sets of runs), so
a change worth a few percent cannot be seen in them. The number of
instructions a replay retires does not move. This counts them with valgrind
on a boot-and-churn trace, three ways:

* the pure-Rust replay harness (``benches/replay.rs``, ``cachegrind
  --cache-sim=no``), once with zero rounds (loading the dump) and once with
  one, the difference per operation;
* the same for its store-only stream (per set);
* the installed extension's own replay, what ``memattr compare`` and
  ``memattr.trace.replay`` run: ``callgrind`` counting only inside
  ``memattr::kvm::replay::replay`` while Python replays the trace. The
  harness is for profiling the core without Python; this is the number
  users get. They differ when the optimizer treats the two builds
  differently: the extension also holds the per-call bindings, which call
  the same steps, and LLVM once kept those steps out of line there and
  inlined them in the harness (10.7% more instructions in the extension).
  ``scripts/install.sh`` builds the extension with profile-guided
  optimization and the harness is built without it, so there the
  extension retires fewer (1 TiB: 1,682 against 1,915 an operation).

    .venv/bin/python benches/bench_instructions.py [--guest 256G] [HARNESS ...]

With no HARNESS it builds the current one (``cargo bench --bench replay
--no-run``); give two or more built harnesses (copies of that binary from
different commits) to compare them on one dump. Fewer instructions do not
always mean less time: at 1 TiB part of an operation's time is waiting for
memory, which this does not count. Report both.

As a benchmark under pytest it runs on a 1 GiB guest when valgrind is
installed and ``MEMATTR_BENCH_INSTRUCTIONS=1`` (it builds the harness, a
minute of compiling), and otherwise skips, saying why.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benches"))

import dump_trace  # noqa: E402

from memattr import stream as stream_mod  # noqa: E402
from memattr import workloads  # noqa: E402


def build_harness() -> Path:
    """Builds benches/replay.rs in the bench profile; its executable."""
    out = subprocess.run(
        ["cargo", "bench", "--bench", "replay", "--no-run", "--message-format=json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for line in out.splitlines():
        msg = json.loads(line)
        if msg.get("reason") == "compiler-artifact" and msg.get("executable"):
            if msg["target"]["name"] == "replay":
                return Path(msg["executable"])
    raise RuntimeError("cargo built no replay harness")


def dump(guest: str, where: Path) -> Path:
    """A boot-and-churn trace of `guest`, dumped for the harness."""
    trace = where / f"bac{guest}.mtr"
    stream_mod.write(workloads.stream("boot-and-churn", guest), str(trace))
    base = where / f"bac{guest}"
    dump_trace.main(str(trace), str(base))
    return base


def instructions(cmd: list[str]) -> tuple[int, str]:
    """Instructions `cmd` retires under valgrind, and its output."""
    run = subprocess.run(
        ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null", *cmd],
        capture_output=True,
        text=True,
        check=True,
    )
    m = re.search(r"I\s+refs:\s+([\d,]+)", run.stderr)
    if m is None:
        raise RuntimeError(f"no instruction count in valgrind's output:\n{run.stderr}")
    return int(m.group(1).replace(",", "")), run.stdout


def count(harness: Path, base: Path) -> dict[str, float]:
    """Instructions per replayed operation and per store-only set."""
    out: dict[str, float] = {}
    for mode, extra, unit in (("replay", [], "ops"), ("store_only", ["--store-only"], "sets")):
        load, _ = instructions([str(harness), str(base), "0", *extra])
        total, text = instructions([str(harness), str(base), "1", *extra])
        # The harness checks the whole dump ran; its line says how much.
        m = re.search(rf"(\d+) {unit} in", text)
        if m is None:
            raise RuntimeError(f"the harness did not report a round:\n{text}")
        n = int(m.group(1))
        out[mode] = (total - load) / n
        out[mode + "_count"] = n
    return out


# Replays a trace file in this package's extension, the way memattr.sweep
# does (a fresh Vm with the trace's options, the native engine), and prints
# how many operations the native replay ran (sets, faults and fallocates;
# the trace's memslot and guest_memfd setup runs per call, outside it).
EXTENSION_REPLAY = """
import sys
import numpy as np
from memattr import trace_io, trace
from memattr.replayer import OP_FAULT, OP_GUEST_MEMFD_FALLOCATE, OP_SET_MEMORY_ATTRIBUTES
from memattr.vm import Vm
tr = trace_io.read(sys.argv[1])
vm = Vm(tr.vm_type, store="rangetree", **tr.meta.get("vm_kwargs", {}))
trace.replay(tr, vm, chunk=1 << 22, engine="native")
native = (OP_SET_MEMORY_ATTRIBUTES, OP_FAULT, OP_GUEST_MEMFD_FALLOCATE)
print("native operations", int(np.isin(tr.ops["kind"], native).sum()))
"""

# The function the extension's replay loop runs in: callgrind counts only
# inside it. A rename (or the optimizer folding it into its caller) makes
# the count 0, which extension_count refuses.
REPLAY_SYMBOL = "memattr::kvm::replay::replay*"


def extension_count(trace: Path) -> dict[str, float]:
    """Instructions per operation inside the installed extension's native
    replay of `trace`."""
    run = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            "--collect-atstart=no",
            f"--toggle-collect={REPLAY_SYMBOL}",
            sys.executable,
            "-c",
            EXTENSION_REPLAY,
            str(trace),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    m = re.search(r"Collected\s*:\s*(\d+)", run.stderr)
    n = re.search(r"native operations (\d+)", run.stdout)
    if m is None or n is None:
        raise RuntimeError(f"no count in valgrind's output:\n{run.stderr}\n{run.stdout}")
    total, ops = int(m.group(1)), int(n.group(1))
    if total == 0 or ops == 0:
        raise RuntimeError(f"callgrind counted nothing inside {REPLAY_SYMBOL}: was it renamed or inlined?")
    return {"extension": total / ops, "extension_count": ops}


def report(guest: str, harnesses: list[Path], where: Path) -> list[dict[str, float]]:
    base = dump(guest, where)
    rows = []
    for h in harnesses:
        c = count(h, base)
        rows.append(c)
        print(
            f"[bench_instructions] boot-and-churn {guest}, {h}: replay "
            f"{c['replay']:,.0f} instructions/op ({c['replay_count']:,.0f} ops), store only "
            f"{c['store_only']:,.0f} instructions/set ({c['store_only_count']:,.0f} sets)"
        )
    ext = extension_count(where / f"bac{guest}.mtr")
    print(
        f"[bench_instructions] boot-and-churn {guest}, the installed extension's native replay "
        f"(what memattr compare runs): {ext['extension']:,.0f} instructions/op "
        f"({ext['extension_count']:,.0f} ops)"
    )
    for row in rows:
        row.update(ext)
    return rows


def test_instructions_per_operation(tmp_path: Path) -> None:
    if shutil.which("valgrind") is None:
        pytest.skip("valgrind is not installed")
    if os.environ.get("MEMATTR_BENCH_INSTRUCTIONS") != "1":
        pytest.skip("set MEMATTR_BENCH_INSTRUCTIONS=1 (it builds the replay harness)")
    (row,) = report("1G", [build_harness()], tmp_path)
    # Counts, not times: only that the runs happened and did work.
    assert row["replay_count"] > 0 and row["replay"] > 0
    assert row["store_only_count"] > 0 and row["store_only"] > 0
    assert row["extension_count"] == row["replay_count"], "the harness and the extension ran the same operations"
    assert row["extension"] > 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--guest", default="256G", help="guest size (default 256G)")
    p.add_argument("harness", nargs="*", type=Path, help="built replay harnesses (default: build one)")
    a = p.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (apt-get install valgrind)")
    harnesses = a.harness or [build_harness()]
    with tempfile.TemporaryDirectory() as d:
        report(a.guest, harnesses, Path(d))


if __name__ == "__main__":
    main()
