"""Traces: both on-disk forms, validation with precise messages, the QEMU
importer, record/replay round trips on a Vm and onto bare stores."""

from __future__ import annotations

import errno
import io
import json
import struct
import zlib

import numpy as np
import pytest

import memattr
from memattr import qemu
from memattr import trace as t
from memattr import workloads as w

GiB, MiB = w.GiB, w.MiB
P = t.KVM_MEMORY_ATTRIBUTE_PRIVATE


def small_trace() -> t.Trace:
    return w.boot_and_churn("6G", nr_vcpus=2, dma_buffers=4, accept_fraction=0.1, implicit=4, seed=1)


def with_results(tr: t.Trace) -> t.Trace:
    ops = tr.ops.copy()
    ops["result"] = np.where(ops["kind"] == t.OP_FAULT, 2, 0)
    ops["result"][::7] = -errno.EINVAL
    ops["result"][ops["kind"] == t.OP_CREATE_GUEST_MEMFD] = 3
    return t.Trace(ops, dict(tr.meta))


# --------------------------------------------------------------------------
# formats


@pytest.mark.parametrize("suffix", [".trace", ".txt"])
def test_round_trip_both_forms(tmp_path, suffix):
    tr = with_results(small_trace())
    path = tmp_path / ("x" + suffix)
    t.write(tr, path)
    back = t.read(path)
    assert (back.ops == tr.ops).all()
    assert back.meta["regions"] == tr.meta["regions"]
    assert back.phases == tr.phases
    assert back.meta["params"] == tr.meta["params"]
    assert t.is_trace_file(path)


def test_text_form_is_readable(tmp_path):
    tr = with_results(small_trace())
    lines = list(t.iter_text_lines(tr))
    assert lines[0] == t.TEXT_HEADER and lines[1].startswith("# meta {")
    assert lines[2] == "create_guest_memfd size=0x180000000 flags=0x0 -> 3"
    assert lines[3].startswith("set_user_memory_region slot=0 gpa=0x0 size=0x80000000 uaddr=0x700000000000 ")
    assert any(line.startswith("fault gpa=") and "access=private,write" in line and line.endswith("-> 2") for line in lines)
    assert any(line.endswith("-> -EINVAL") for line in lines)
    assert any("access=shared,write,convert" in line for line in lines)


def test_binary_is_compact_and_documented_layout(tmp_path):
    tr = small_trace()
    path = tmp_path / "x.trace"
    t.write_binary(tr, path)
    data = path.read_bytes()
    magic, version, rec, meta_len, count, _, _ = struct.unpack_from("<8sHHIQII", data)
    assert (magic, version, rec, count) == (b"MEMATTRT", 2, 40, len(tr))
    assert meta_len % 8 == 0 and len(data) == 32 + meta_len + 40 * len(tr)
    json.loads(data[32 : 32 + meta_len])
    # first record: create_guest_memfd, kind at byte 36 of the record
    rec0 = data[32 + meta_len : 32 + meta_len + 40]
    assert rec0[36] == t.OP_CREATE_GUEST_MEMFD


def test_write_to_file_objects():
    tr = small_trace()
    buf = io.BytesIO()
    t.write_binary(tr, buf)
    assert (t.parse_binary(buf.getvalue()).ops == tr.ops).all()
    sbuf = io.StringIO()
    t.write_text(tr, sbuf)
    assert (t.parse_text(sbuf.getvalue().splitlines()).ops == tr.ops).all()


def test_concat_renumbers_regions():
    a = w.setup("6G")
    b = w.setup("1G")
    joined = t.concat([("a", a), ("b", b)], {"vm_type": 1})
    assert len(joined.meta["regions"]) == 3
    region_ops = joined.ops[joined.ops["kind"] == t.OP_SET_USER_MEMORY_REGION]
    assert region_ops["aux"].tolist() == [0, 1, 2]
    assert joined.phases == [("a", 0, 3), ("b", 3, 5)]


def test_trace_rejects_wrong_dtype():
    with pytest.raises(TypeError, match="OP_DTYPE"):
        t.Trace(np.zeros(3))


# --------------------------------------------------------------------------
# rejecting bad binary files, naming the byte offset


def binary_bytes(tr: t.Trace) -> bytearray:
    buf = io.BytesIO()
    t.write_binary(tr, buf)
    return bytearray(buf.getvalue())


def body_offset(data: bytes) -> int:
    return 32 + struct.unpack_from("<I", data, 12)[0]  # v2: header of 32 bytes


def reseal(data: bytearray) -> bytes:
    """``data`` (a v2 binary trace, damaged on purpose) with its two CRCs
    recomputed, so the reader's other checks are the ones tested."""
    from memattr.trace_binary import pack_header

    count = struct.unpack_from("<Q", data, 16)[0]
    body = body_offset(data)
    return pack_header(bytes(data[32:body]), count, zlib.crc32(data[body:])) + bytes(data[32:])


def test_bad_binary_magic(tmp_path):
    data = binary_bytes(small_trace())
    data[:8] = b"NOTTRACE"
    p = tmp_path / "bad.trace"
    p.write_bytes(bytes(data))
    with pytest.raises(t.TraceFormatError, match="byte offset 0"):
        t.read(p)  # neither form
    data[:1] = b"M"
    with pytest.raises(t.TraceFormatError, match="byte offset 0: bad magic"):
        t.parse_binary(bytes(data))


def test_bad_binary_header_fields():
    good = binary_bytes(small_trace())
    data = bytearray(good)
    struct.pack_into("<H", data, 8, 9)
    with pytest.raises(t.TraceFormatError, match="byte offset 8: unsupported version 9"):
        t.parse_binary(bytes(data))
    data = bytearray(good)
    struct.pack_into("<H", data, 10, 32)
    with pytest.raises(t.TraceFormatError, match="byte offset 10: record size 32"):
        t.parse_binary(bytes(data))
    data = bytearray(good)
    struct.pack_into("<I", data, 12, 3)
    with pytest.raises(t.TraceFormatError, match="byte offset 12: bad metadata length"):
        t.parse_binary(bytes(data))
    with pytest.raises(t.TraceFormatError, match="too short"):
        t.parse_binary(bytes(good[:10]))


def test_bad_binary_metadata():
    data = binary_bytes(small_trace())
    data[32] = ord("!")
    with pytest.raises(t.TraceFormatError, match="byte offset 28: header checksum mismatch"):
        t.parse_binary(bytes(data))
    with pytest.raises(t.TraceFormatError, match="byte offset 32: bad metadata JSON"):
        t.parse_binary(reseal(data))
    tr = small_trace()
    tr.meta["regions"] = [[1, 2]]
    buf = io.BytesIO()
    with pytest.raises(t.TraceFormatError):
        t.write_binary(tr, buf)  # validation refuses to write it either


def test_truncated_binary_names_offset():
    data = binary_bytes(small_trace())
    body = body_offset(data)
    with pytest.raises(t.TraceFormatError, match=rf"byte offset {body}: header says \d+ records"):
        t.parse_binary(bytes(data[:-5]))


@pytest.mark.parametrize(
    "field_offset,value,match",
    [
        (36, 9, "unknown operation kind 9"),
        (37, 0x80, "flags are only defined for fault"),
        (38, 5, "aux is only defined"),
    ],
)
def test_bad_binary_record_names_record_and_offset(field_offset, value, match):
    data = binary_bytes(small_trace())
    body = body_offset(data)
    i = 10  # a set or fault record past the setup
    data[body + i * 40 + field_offset] = value
    with pytest.raises(t.TraceFormatError, match="records checksum mismatch"):
        t.parse_binary(bytes(data))
    with pytest.raises(t.TraceFormatError, match=rf"record {i} at byte offset {body + i * 40}: {match}"):
        t.parse_binary(reseal(data))


def test_bad_fault_record():
    tr = small_trace()
    i = int(np.flatnonzero(tr.ops["kind"] == t.OP_FAULT)[0])
    ops = tr.ops.copy()
    ops["flags"][i] = 0x40
    with pytest.raises(t.TraceFormatError, match=f"record {i}: unknown fault flags 0x40"):
        t.Trace(ops, tr.meta).validate()
    ops = tr.ops.copy()
    ops["size"][i] = 4096
    with pytest.raises(t.TraceFormatError, match=f"record {i}: fault operations must have"):
        t.Trace(ops, tr.meta).validate()
    ops = tr.ops.copy()
    j = int(np.flatnonzero(ops["kind"] == t.OP_SET_USER_MEMORY_REGION)[0])
    ops["aux"][j] = 77
    with pytest.raises(t.TraceFormatError, match=f"record {j}: regions index 77 out of range"):
        t.Trace(ops, tr.meta).validate()


# --------------------------------------------------------------------------
# rejecting bad text files, naming the line


def text_lines(tr: t.Trace | None = None) -> list[str]:
    return list(t.iter_text_lines(tr or small_trace()))


@pytest.mark.parametrize(
    "lineno,text,match",
    [
        (5, "frobnicate gpa=0x0", "unknown operation 'frobnicate'"),
        (5, "set_memory_attributes gpa=0x0 size=0x1000", "missing field 'attributes'"),
        (5, "set_memory_attributes gpa=0xzz size=0x1000 attributes=0x8", "gpa: '0xzz' is not an integer"),
        (5, "set_memory_attributes gpa=0x0 size=0x1000 attributes=0x8 bogus=1", "unknown field 'bogus'"),
        (5, "set_memory_attributes gpa=0x0 gpa=0x0 size=0x1000 attributes=0x8", "duplicate field 'gpa'"),
        (5, "set_memory_attributes gpa=-1 size=0x1000 attributes=0x8", "out of range"),
        (5, "set_memory_attributes gpa=0x0 size 0x1000 attributes=0x8", "expected key=value"),
        (5, "fault gpa=0x1000 access=private,sideways", "unknown access 'sideways'"),
        (5, "fault gpa=0x1000 access=private,shared", "contradictory access"),
        (5, "fault gpa=0x1000 access=private -> -EWHAT", "unknown errno name 'EWHAT'"),
        (5, "fault gpa=0x1000 access=private -> two", "not an integer"),
        (2, "# meta {not json", "bad metadata JSON"),
        (2, '# meta {"vm_type": -1}', "vm_type"),
    ],
)
def test_bad_text_names_line(lineno, text, match):
    lines = text_lines()
    lines[lineno - 1] = text
    with pytest.raises(t.TraceFormatError, match=rf"<trace> line {lineno}: .*{match}"):
        t.parse_text(lines)


def test_text_header_required(tmp_path):
    with pytest.raises(t.TraceFormatError, match="line 1: expected '# memattr trace v2'"):
        t.parse_text(["set_memory_attributes gpa=0x0 size=0x1000 attributes=0x8"])
    with pytest.raises(t.TraceFormatError, match="line 1: empty file"):
        t.parse_text([])
    p = tmp_path / "bad.txt"
    p.write_bytes(b"# memattr trace v1\n\xff\xfe\n")
    with pytest.raises(t.TraceFormatError, match="not UTF-8"):
        t.read(p)
    p.write_text("# memattr trace v1\nfault gpa=0x0 access=shared\nfault gpa=0x0 access=up\n")
    with pytest.raises(t.TraceFormatError, match=rf"{p} line 3: unknown access 'up'"):
        t.read(p)


def test_text_comments_blank_lines_and_symbolic_results():
    lines = [
        t.TEXT_HEADER_V1,  # hand-written: v1 needs no end line
        "",
        "# a comment",
        "set_memory_attributes gpa=0x0 size=0x1000 attributes=0x8 -> -EINVAL",
        "fault gpa=0x2000 access=private,write,convert -> 1",
        "create_guest_memfd size=0x1000 -> 4",
    ]
    tr = t.parse_text(lines)
    assert tr.ops["result"].tolist() == [-errno.EINVAL, 1, 4]
    assert tr.ops["flags"].tolist() == [0, t.FLAG_PRIVATE | t.FLAG_WRITE | t.FLAG_CONVERT, 0]
    assert tr.ops["arg"].tolist() == [0, 0, 0]


# --------------------------------------------------------------------------
# QEMU importer

QEMU_LOG = """\
qemu-system-x86_64: -accel kvm: warning: something unrelated
kvm_convert_memory start 0x80000000 size 0x200000 private_to_shared
4242@1700000000.123456:kvm_convert_memory start 0x100000000 size 0x1000 private_to_shared
2024-01-31T16:17:21.123456Z (4242) kvm_memory_fault start 0x100002000 size 0x1000 flags 0x0
2024-01-31T16:17:21.123460Z kvm_convert_memory start 0x100002000 size 0x1000 private_to_shared
4242@1700000000.223456:kvm_memory_fault start 0x100002000 size 0x1000 flags 0x8
4242@1700000000.223457:kvm_convert_memory start 0x100002000 size 0x1000 shared_to_private
4242@1700000000.3:kvm_set_user_memory Slot#0 flags=0x4 gpa=0x0 size=0x80000000 ok=1
"""


def test_qemu_parse_log_formats():
    tr = qemu.parse_log(QEMU_LOG.splitlines())
    ops = tr.ops
    assert ops["kind"].tolist() == [0, 0, 1, 0, 1, 0]
    assert ops["gpa"].tolist() == [0x80000000, 0x100000000, 0x100002000, 0x100002000, 0x100002000, 0x100002000]
    assert ops["size"].tolist() == [0x200000, 0x1000, 0, 0x1000, 0, 0x1000]
    assert ops["attributes"].tolist() == [0, 0, 0, 0, 0, P]
    assert ops["flags"].tolist() == [0, 0, 0, 0, t.FLAG_PRIVATE, 0]


def test_qemu_import_log_adds_setup_and_creation(tmp_path):
    p = tmp_path / "qemu.log"
    p.write_text(QEMU_LOG)
    tr = qemu.import_log(p, "6G")
    assert [n for n, _, _ in tr.phases] == ["setup", "creation", "qemu"]
    tr.validate()
    # What QEMU asked of KVM: the conversion in the PCI hole (2G..4G) never
    # reached it; each conversion to shared is followed by a guest_memfd hole
    # at the range's offset in RAM (RAM from 4G starts at file offset 2G).
    _, lo, hi = tr.phases[-1]
    ops = tr.ops[lo:hi]
    assert tr.meta["qemu_events"] == 6
    assert ops["kind"].tolist() == [0, 4, 1, 0, 4, 1, 0]
    holes = ops[ops["kind"] == t.OP_GUEST_MEMFD_FALLOCATE]
    assert holes["gpa"].tolist() == [2 * GiB, 2 * GiB + 0x2000]
    assert holes["size"].tolist() == [0x1000, 0x1000]
    assert (holes["attributes"] == w.GUEST_MEMFD_FD).all() and (holes["arg"] == 3).all()
    tr2 = qemu.import_log(QEMU_LOG.splitlines(), "6G", initial_private=False, discard=False)
    assert [n for n, _, _ in tr2.phases] == ["setup", "qemu"]
    assert tr2.ops[tr2.phases[-1][1]:]["kind"].tolist() == [0, 1, 0, 1, 0]
    # Replayed: the logged exits exit again (EFAULT), the holes are punched.
    vm = memattr.Vm(memattr.KVM_X86_SW_PROTECTED_VM, guest_memfd_max_order=9)
    res = t.replay(tr, vm)
    assert res.errors == {"EFAULT": 2} and res.fault_exits == 2
    assert vm.stats.gmem_holes_punched == 2


@pytest.mark.parametrize(
    "line",
    [
        "kvm_convert_memory start 0x1000 size 0x1000 sideways",
        "kvm_convert_memory start 1000 size 0x1000 private_to_shared",
        "1@2.3:kvm_memory_fault start 0x1000 size 0x1000",
    ],
)
def test_qemu_malformed_line_names_line(line):
    # --strict: the old behaviour, an error naming the line.
    with pytest.raises(t.TraceFormatError, match=r"line 3: malformed QEMU trace line"):
        qemu.parse_log(["x", "kvm_convert_memory start 0x0 size 0x1000 shared_to_private", line], strict=True)
    # By default: skipped and counted, with the first one named.
    tr = qemu.parse_log(["x", "kvm_convert_memory start 0x0 size 0x1000 shared_to_private", line])
    assert len(tr) == 1
    assert tr.meta["qemu_skipped"] == {"no_event": 1, "malformed": 1, "first_malformed": f"line 3: {line!r}"}


def test_qemu_value_too_big():
    with pytest.raises(t.TraceFormatError, match="line 1: value does not fit"):
        qemu.parse_log(["kvm_convert_memory start 0x1" + "0" * 16 + " size 0x1000 shared_to_private"])


@pytest.mark.parametrize("engine", ["python", "native"])
def test_with_discards_uses_the_traces_own_guest_memfds(engine):
    """A recorded session's guest_memfd fds are the Vm's (>= 1 << 20, one per
    slot here), not fd 3: each hole goes to the fd bound to its memslot, at
    the range's offset in that file."""
    rec = t.Recorder(_vm())
    fd_lo = rec.create_guest_memfd(GiB)
    fd_hi = rec.create_guest_memfd(2 * GiB)
    assert fd_lo >= 1 << 20 and fd_hi >= 1 << 20 and fd_lo != fd_hi
    rec.set_user_memory_region(0, 0, GiB, w.USERSPACE_BASE, w.KVM_MEM_GUEST_MEMFD, fd_lo, 0)
    # The high slot binds the second file from 1 GiB in.
    rec.set_user_memory_region(1, 4 * GiB, GiB, w.USERSPACE_BASE + GiB, w.KVM_MEM_GUEST_MEMFD, fd_hi, GiB)
    with pytest.raises(OSError) as e:  # overlaps slot 0: recorded as failed, binds nothing
        rec.set_user_memory_region(2, 0, GiB, w.USERSPACE_BASE, w.KVM_MEM_GUEST_MEMFD, fd_hi, 0)
    assert e.value.errno == errno.EEXIST
    rec.set_memory_attributes(0, GiB, P)
    rec.set_memory_attributes(4 * GiB, GiB, P)
    rec.set_memory_attributes(2 * MiB, 2 * MiB, 0)  # in the low slot
    rec.set_memory_attributes(4 * GiB + 6 * MiB, 0x3000, 0)  # in the high slot
    rec.set_memory_attributes(2 * GiB, 0x1000, 0)  # no memslot: no hole
    rec.set_memory_attributes(4 * GiB + 6 * MiB, 0x1000, P)  # to private: no hole
    recorded = rec.trace()

    tr = qemu.with_discards(recorded)
    tr.validate()
    holes = tr.ops[tr.ops["kind"] == t.OP_GUEST_MEMFD_FALLOCATE]
    assert holes["attributes"].tolist() == [fd_lo, fd_hi]
    assert holes["gpa"].tolist() == [2 * MiB, GiB + 6 * MiB]
    assert holes["size"].tolist() == [2 * MiB, 0x3000]
    assert (holes["arg"] == t.PUNCH_HOLE_MODE).all()

    vm = _vm()
    res = t.replay(tr, vm, engine=engine, check=True)
    assert res.errors == {"EEXIST": 1} and res.mismatches == 0, (res.errors, res.first_mismatch)
    assert vm.stats.gmem_holes_punched == 2


# --------------------------------------------------------------------------
# bare stores


def store_runs(store, end):
    return list(store.runs(0, end))


def test_apply_to_store_same_state_on_both_stores():
    tr = small_trace()
    end = (8 * GiB) >> 12
    rt, xa = memattr.RangeTree(), memattr.XArray()
    n = t.apply_to_store(tr, rt)
    assert n == tr.counts()["set_memory_attributes"]
    t.apply_to_store(tr, xa)
    assert store_runs(rt, end) == store_runs(xa, end)
    # generated kexec leaves RAM private (implicit pages were never set by
    # the generator itself: they are converted on replay)
    lay = w.GuestLayout.build("6G")
    for r in lay.regions:
        assert rt.has_value(r.gpa >> 12, r.end >> 12, P)


def test_apply_to_store_skips_failed_and_rejects_inconsistent():
    ops = t.set_ops([0, 0x1000, 0x2000], [0x1000, 0x1000, 0x1000], P)
    ops["result"] = [0, -errno.EINVAL, t.RESULT_NONE]
    rt = memattr.RangeTree()
    assert t.apply_to_store(t.Trace(ops), rt) == 2
    assert [rt.get(0), rt.get(1), rt.get(2)] == [P, 0, P]
    bad = t.set_ops([0x10], [0x1000], P)
    bad["result"] = 0
    with pytest.raises(t.TraceFormatError, match="record 0"):
        t.apply_to_store(t.Trace(bad), memattr.RangeTree())


def test_describe():
    d = t.describe(small_trace())
    assert d["name"] == "boot-and-churn" and d["operations"] > 0
    assert d["bytes_to_private"] >= 6 * GiB
    assert set(d["phases"]) == {"setup", "creation", "sharing", "acceptance", "implicit", "churn", "kexec"}


# --------------------------------------------------------------------------
# record and replay on a Vm


def _vm(store: str = "rangetree"):
    from memattr.vm import Vm

    return Vm(w.KVM_X86_SW_PROTECTED_VM, store=store, guest_memfd_max_order=9)


def _state(vm) -> list[tuple[int, int, int]]:
    return list(vm.store.runs(0, (16 * GiB) >> 12))


def _recorded(store: str = "rangetree") -> tuple[t.Trace, object]:
    gen = w.boot_and_churn("6G", nr_vcpus=2, dma_buffers=8, accept_fraction=0.2, implicit=8, seed=4, kexec_at_end=False)
    rec = t.Recorder(_vm(store), {"vm_kwargs": {"guest_memfd_max_order": 9}})
    res = t.replay(gen, rec)
    assert res.implicit_conversions == 8 and res.fault_exits == 8 and not res.errors
    # calls that fail on purpose are recorded with their errno
    with pytest.raises(OSError) as e:
        rec.set_memory_attributes(0x1001, 0x1000, P)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(OSError):
        rec.set_memory_attributes(0, 0x1000, P, flags=1)
    from memattr.errors import MemoryFault

    with pytest.raises(MemoryFault):
        rec.fault(0x2000, private=False)  # RAM is private: exits
    return rec.trace(), rec.vm


@pytest.mark.parametrize("suffix", [".trace", ".txt"])
@pytest.mark.parametrize("store", ["rangetree", "xarray"])
def test_record_write_read_replay_same_state_and_counters(tmp_path, suffix, store):
    recorded, vm0 = _recorded()
    ops = recorded.ops
    # implicit conversions were recorded as what happened: exit, set, retry
    assert (ops["result"] != t.RESULT_NONE).all()
    assert int((ops["result"] == -errno.EFAULT).sum()) == 8 + 1
    assert int((ops["result"] == -errno.EINVAL).sum()) == 2
    path = tmp_path / ("rec" + suffix)
    t.write(recorded, path)
    back = t.read(path)
    assert (back.ops == recorded.ops).all()
    vm1 = _vm(store)
    res = t.replay(back, vm1, check=True)
    assert res.mismatches == 0, res.first_mismatch
    assert res.errors == {"EINVAL": 2, "EFAULT": 9}
    assert _state(vm1) == _state(vm0)
    assert vm1.stats.as_dict() == vm0.stats.as_dict()


def test_replay_check_reports_mismatch():
    recorded, _ = _recorded()
    ops = recorded.ops.copy()
    i = int(np.flatnonzero(ops["kind"] == t.OP_SET_MEMORY_ATTRIBUTES)[3])
    ops["result"][i] = -errno.ENOMEM
    res = t.replay(t.Trace(ops, recorded.meta), _vm(), check=True)
    assert res.mismatches == 1 and f"op {i} " in res.first_mismatch


def test_replay_progress_and_phases():
    tr = small_trace()
    seen: list[int] = []
    vm = _vm()
    res = t.replay(tr, vm, progress=seen.append, chunk=100)
    assert sum(seen) == len(tr) == res.ops
    assert set(res.phase_seconds) == {n for n, _, _ in tr.phases}
    assert res.phase_memory["kexec"] == vm.store.memory_bytes()
    assert res.peak_memory >= res.phase_memory["churn"]


def test_recorder_records_ioctl_and_passes_other_attributes():
    vm = _vm()
    rec = t.Recorder(vm)
    assert rec.stats == vm.stats and rec.store is vm.store  # pass-through
    fd = rec.create_guest_memfd(1 << 21)
    rec.set_user_memory_region(0, 0, 1 << 21, w.USERSPACE_BASE, w.KVM_MEM_GUEST_MEMFD, fd, 0)
    arg = memattr.kvm_memory_attributes(0, 1 << 21, P, 0)
    rec.ioctl(memattr.KVM_SET_MEMORY_ATTRIBUTES, arg)
    tr = rec.trace()
    assert tr.ops["kind"].tolist() == [t.OP_CREATE_GUEST_MEMFD, t.OP_SET_USER_MEMORY_REGION, t.OP_SET_MEMORY_ATTRIBUTES]
    assert tr.ops["result"].tolist() == [fd, 0, 0]
    assert tr.meta["regions"] == [[0, w.USERSPACE_BASE, fd]]
    # replay onto a fresh Vm maps the fd
    vm2 = _vm("xarray")
    assert t.replay(tr, vm2, check=True).mismatches == 0
    assert vm2.get_memory_attributes(0) == P


# --------------------------------------------------------------------------
# property: any valid trace survives both forms bit for bit

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_u64 = st.integers(0, (1 << 64) - 1)
_res = st.one_of(st.just(t.RESULT_NONE), st.integers(-(1 << 31) + 1, (1 << 31) - 1))
_op = st.one_of(
    st.tuples(st.just(t.OP_SET_MEMORY_ATTRIBUTES), _u64, _u64, _u64, _u64, _res, st.just(0)),
    st.tuples(st.just(t.OP_FAULT), _u64, st.just(0), st.just(0), st.just(0), _res, st.integers(0, 15)),
    st.tuples(st.just(t.OP_CREATE_GUEST_MEMFD), st.just(0), _u64, st.just(0), _u64, _res, st.just(0)),
    st.tuples(st.just(t.OP_SET_USER_MEMORY_REGION), _u64, _u64, st.integers(0, (1 << 32) - 1), _u64, _res, st.just(0)),
    st.tuples(
        st.just(t.OP_GUEST_MEMFD_FALLOCATE), _u64, _u64, st.integers(0, (1 << 32) - 1), st.integers(0, (1 << 32) - 1), _res, st.just(0)
    ),
    st.tuples(st.just(t.OP_GUEST_MEMFD_CLOSE), st.just(0), st.just(0), st.integers(0, (1 << 32) - 1), st.just(0), _res, st.just(0)),
)


@given(st.lists(_op, max_size=30), st.integers(0, 3))
def test_any_valid_trace_round_trips(rows, vm_type):
    ops = t.empty_ops(len(rows))
    regions = []
    for i, (kind, gpa, size, attrs, arg, result, flags) in enumerate(rows):
        ops[i] = (gpa, size, attrs, arg, result, kind, flags, 0)
        if kind == t.OP_SET_USER_MEMORY_REGION:
            ops["aux"][i] = len(regions)
            regions.append([i, (i * 4096) << 20, i - 1])
    tr = t.Trace(ops, {"vm_type": vm_type, "regions": regions, "name": "prop"})
    buf = io.BytesIO()
    t.write_binary(tr, buf)
    back = t.parse_binary(buf.getvalue())
    assert (back.ops == tr.ops).all() and back.meta == tr.meta
    text = list(t.iter_text_lines(tr))
    back = t.parse_text(text)
    assert (back.ops == tr.ops).all() and back.meta["regions"] == regions and back.vm_type == vm_type


def test_guest_memfd_fallocate_and_close_record_write_read_replay(tmp_path):
    from memattr.vm import Vm
    from memattr.uapi import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE

    punch = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
    rec = t.Recorder(Vm(memattr.KVM_X86_SW_PROTECTED_VM, "rangetree", guest_memfd_max_order=9))
    fd = rec.create_guest_memfd(GiB)
    rec.set_user_memory_region(0, 0, GiB, w.USERSPACE_BASE, w.KVM_MEM_GUEST_MEMFD, fd, 0)
    rec.set_memory_attributes(0, GiB, P)
    assert rec.fault(0, private=True) == 2
    rec.guest_memfd_fallocate(fd, punch, 0, 2 * MiB)
    with pytest.raises(OSError):
        rec.guest_memfd_fallocate(fd, punch, -4096, 4096)  # EINVAL, recorded
    rec.guest_memfd_close(fd)
    with pytest.raises(OSError):
        rec.guest_memfd_close(fd)  # EBADF, recorded
    with pytest.raises(memattr.MemoryFault):
        rec.fault(0, private=True)
    recorded = rec.trace()
    kinds = recorded.ops["kind"].tolist()
    assert kinds[4:8] == [t.OP_GUEST_MEMFD_FALLOCATE] * 2 + [t.OP_GUEST_MEMFD_CLOSE] * 2
    assert recorded.ops["result"][4:8].tolist() == [0, -errno.EINVAL, 0, -errno.EBADF]
    lines = list(t.iter_text_lines(recorded))
    assert f"guest_memfd_fallocate fd={fd} mode=0x3 offset=-0x1000 len=0x1000 -> -EINVAL" in lines
    assert f"guest_memfd_close fd={fd} -> 0" in lines
    for suffix in (".trace", ".txt"):
        path = tmp_path / ("g" + suffix)
        t.write(recorded, path)
        back = t.read(path)
        assert (back.ops == recorded.ops).all()
        vm = Vm(memattr.KVM_X86_SW_PROTECTED_VM, "xarray", guest_memfd_max_order=9)
        res = t.replay(back, vm, check=True)
        assert res.mismatches == 0, res.first_mismatch
        assert vm.stats.as_dict() == rec.vm.stats.as_dict()


def test_guest_memfd_ops_are_validated():
    ops = t.empty_ops(1)
    ops["kind"] = t.OP_GUEST_MEMFD_CLOSE
    ops["gpa"] = 4096
    with pytest.raises(t.TraceFormatError, match="record 0.*guest_memfd_close operations must have gpa, size and arg 0"):
        t.Trace(ops, {}).validate()
    ops = t.empty_ops(1)
    ops["kind"] = t.OP_GUEST_MEMFD_FALLOCATE
    ops["attributes"] = 1 << 40
    with pytest.raises(t.TraceFormatError, match="fd must fit in 32 bits"):
        t.Trace(ops, {}).validate()
    ops["attributes"] = 3
    ops["arg"] = 1 << 33
    with pytest.raises(t.TraceFormatError, match="mode must fit in 32 bits"):
        t.Trace(ops, {}).validate()
    with pytest.raises(t.TraceFormatError, match="line 3.*len"):
        t.parse_text(["# memattr trace v1", "# meta {}", "guest_memfd_fallocate fd=3 mode=0x3 offset=0x0"])


def test_replay_refuses_a_malformed_trace_before_running_anything():
    from memattr.vm import Vm

    ops = t.empty_ops(2)
    ops["kind"] = [t.OP_SET_MEMORY_ATTRIBUTES, 9]
    vm = Vm(memattr.KVM_X86_SW_PROTECTED_VM)
    for engine in ("python", "native"):
        with pytest.raises(t.TraceFormatError, match="record 1: unknown operation kind 9"):
            t.replay(t.Trace(ops, {}), vm, engine=engine)
    assert vm.stats.set_calls == 0
