"""Instructions per operation of the native replay: a count, not a timing.

Times on a shared machine move with the neighbours' load (the same build's
best 1 TiB replay has ranged from 283 to 420 ns/op between sets of runs), so
a change worth a few percent cannot be seen in them. The number of
instructions a replay retires does not move: this counts them with
valgrind (``cachegrind --cache-sim=no``) for the pure-Rust replay harness
(``benches/replay.rs``) on a boot-and-churn dump, once with zero rounds (the
harness loading the dump) and once with one, and reports the difference
per operation; likewise for the store-only stream (per set).

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
