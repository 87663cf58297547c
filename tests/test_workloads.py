"""Workload generators: each stream checked against its documented shape."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from memattr import workloads as w
from memattr.trace import (
    FLAG_CONVERT,
    FLAG_PRIVATE,
    FLAG_WRITE,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
    OP_CREATE_GUEST_MEMFD,
    OP_FAULT,
    OP_SET_MEMORY_ATTRIBUTES,
    OP_SET_USER_MEMORY_REGION,
    RESULT_NONE,
)

GiB, MiB, KiB = w.GiB, w.MiB, w.KiB
P = KVM_MEMORY_ATTRIBUTE_PRIVATE


def sets(trace):
    return trace.ops[trace.ops["kind"] == OP_SET_MEMORY_ATTRIBUTES]


def faults(trace):
    return trace.ops[trace.ops["kind"] == OP_FAULT]


def psc_entries(gpa: int, size: int) -> int:
    """Entries Linux's SNP guest uses for [gpa, gpa + size)."""
    n, a, end = 0, gpa, gpa + size
    while a < end:
        a += w.SZ_2M if a % w.SZ_2M == 0 and end - a >= w.SZ_2M else 4096
        n += 1
    return n


class Pages:
    """Reference page-attribute model: a numpy array over [0, limit)."""

    def __init__(self, limit: int, value: int = 0) -> None:
        self.a = np.full(limit // 4096, value, dtype=np.uint64)

    def apply(self, trace) -> None:
        for op in sets(trace).tolist():
            gpa, size, attrs = op[0], op[1], op[2]
            self.a[gpa // 4096 : (gpa + size) // 4096] = attrs


# --------------------------------------------------------------------------
# sizes and layout


@pytest.mark.parametrize(
    "text,value",
    [("4096", 4096), ("512M", 512 * MiB), ("64G", 64 * GiB), ("1T", 1 << 40), ("1.5G", 3 * GiB // 2), ("2GiB", 2 * GiB), (7, 7)],
)
def test_parse_size(text, value):
    assert w.parse_size(text) == value


@pytest.mark.parametrize("bad", ["", "G", "12X", "1.0000001K", "-1G"])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError, match="size"):
        w.parse_size(bad)


def test_parse_size_types():
    with pytest.raises(TypeError):
        w.parse_size(True)
    with pytest.raises(TypeError):
        w.parse_size(1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        w.parse_size(-1)
    assert w.format_size(64 * GiB) == "64G" and w.format_size(3 * GiB // 2) == "1536M"


def test_layout_small_guest_is_one_low_slot():
    lay = w.GuestLayout.build("1G")
    assert lay.regions == (w.Region(0, 0, GiB, 0),)
    assert lay.low_size == GiB


def test_layout_splits_at_pci_hole():
    lay = w.GuestLayout.build("64G")
    assert lay.regions == (w.Region(0, 0, 2 * GiB, 0), w.Region(1, 4 * GiB, 62 * GiB, 2 * GiB))
    lay = w.GuestLayout.build("64G", low_limit="3G", high_slots=4)
    assert lay.low_size == 3 * GiB
    high = lay.regions[1:]
    assert len(high) == 4
    assert sum(r.size for r in high) == 61 * GiB
    assert all(r.size % w.SZ_2M == 0 for r in high)
    for a, b in zip(high, high[1:]):
        assert a.end == b.gpa and a.guest_memfd_offset + a.size == b.guest_memfd_offset
    assert high[0].gpa == 4 * GiB


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"ram_size": "1M"}, "ram_size"),
        ({"ram_size": 0}, "ram_size"),
        ({"ram_size": "4P"}, "52-bit"),
        ({"ram_size": "4G", "low_limit": "1M"}, "low_limit"),
        ({"ram_size": "4G", "low_limit": "4G"}, "low_limit"),
        ({"ram_size": "4G", "high_slots": 0}, "high_slots"),
    ],
)
def test_layout_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        w.GuestLayout.build(**kwargs)


# --------------------------------------------------------------------------
# setup and creation


def test_setup_binds_one_guest_memfd():
    lay = w.GuestLayout.build("8G", high_slots=2)
    tr = w.setup(lay)
    ops = tr.ops
    assert ops["kind"].tolist() == [OP_CREATE_GUEST_MEMFD] + [OP_SET_USER_MEMORY_REGION] * 3
    assert int(ops["size"][0]) == 8 * GiB and int(ops["result"][0]) == 3
    for i, r in enumerate(lay.regions, 1):
        assert (int(ops["gpa"][i]), int(ops["size"][i]), int(ops["arg"][i])) == (r.gpa, r.size, r.guest_memfd_offset)
        assert int(ops["attributes"][i]) == w.KVM_MEM_GUEST_MEMFD
        slot, uaddr, fd = tr.meta["regions"][int(ops["aux"][i])]
        assert (slot, uaddr, fd) == (r.slot, w.USERSPACE_BASE + r.guest_memfd_offset, 3)
    tr.validate()


def test_vm_creation_one_private_call_per_slot():
    lay = w.GuestLayout.build("64G", high_slots=3)
    s = sets(w.vm_creation(lay))
    assert len(s) == len(lay.regions) == 4
    assert [(int(x["gpa"]), int(x["size"])) for x in s] == [(r.gpa, r.size) for r in lay.regions]
    assert (s["attributes"] == P).all() and (s["result"] == RESULT_NONE).all()


# --------------------------------------------------------------------------
# firmware and kernel sharing


@pytest.mark.parametrize(
    "ram,size",
    [(GiB, 64 * MiB), (4 * GiB, 246 * MiB - 768 * KiB + 768 * KiB), (64 * GiB, GiB), (1 << 40, GiB)],
)
def test_swiotlb_size_rule(ram, size):
    got = w.swiotlb_size(ram)
    expect = min(max(ram * 6 // 100, 64 * MiB), GiB)
    assert got >= expect and got - expect < 256 * KiB and got % (256 * KiB) == 0
    if ram in (GiB, 64 * GiB, 1 << 40):
        assert got == size


@pytest.mark.parametrize("style", ["tdx", "snp"])
@pytest.mark.parametrize("guest", ["1G", "16G"])
def test_firmware_sharing_shape(style, guest):
    lay = w.GuestLayout.build(guest)
    tr = w.firmware_sharing(lay, style=style, nr_vcpus=6, dma_buffers=20, seed=3)
    s = sets(tr)
    assert (s["attributes"] == 0).all()
    assert (s["gpa"] % 4096 == 0).all() and (s["size"] % 4096 == 0).all()
    tlb = w.swiotlb_size(lay.ram_size)
    tlb_start = (lay.low_end - tlb) // w.SZ_2M * w.SZ_2M
    # SWIOTLB: contiguous requests from tlb_start covering exactly tlb bytes
    n_tlb = len(s) - 6 - 20
    head = s[:n_tlb]
    assert int(head["gpa"][0]) == tlb_start
    assert int(head["size"].sum()) == tlb
    assert (head["gpa"][1:] == head["gpa"][:-1] + head["size"][:-1]).all()
    if style == "tdx":
        assert (head["size"] <= w.SZ_2M).all() and n_tlb == -(-tlb // w.SZ_2M)
    else:
        assert all(psc_entries(int(g), int(z)) <= 253 for g, z in zip(head["gpa"], head["size"]))
    # per-vCPU pages: 4K each, distinct, below the SWIOTLB, above 2 MiB
    vcpu = s[n_tlb : n_tlb + 6]
    assert (vcpu["size"] == 4096).all() and len(set(vcpu["gpa"].tolist())) == 6
    assert (vcpu["gpa"] >= w.SZ_2M).all() and (vcpu["gpa"] < tlb_start).all()
    # DMA buffers: 4K..64K powers of two, naturally aligned
    dma = s[n_tlb + 6 :]
    sizes = dma["size"].astype(np.int64)
    assert set(sizes.tolist()) <= {4096 << o for o in range(5)}
    assert (dma["gpa"].astype(np.int64) % sizes == 0).all()
    # nothing overlaps, and the shared set is exactly the union
    shared = tr.shared
    total = tlb + 6 * 4096 + int(sizes.sum())
    assert shared.bytes == total
    # touch faults: shared writes inside the shared set
    f = faults(tr)
    assert (f["flags"] == FLAG_WRITE).all()
    idx = np.searchsorted(shared.starts, f["gpa"], side="right") - 1
    assert (f["gpa"] < shared.ends[idx]).all()
    # 1 per range + one per 2 MiB boundary strictly inside
    assert len(f) >= len(shared.starts)


def test_firmware_sharing_is_seeded():
    a = w.firmware_sharing("4G", seed=1).ops
    b = w.firmware_sharing("4G", seed=1).ops
    c = w.firmware_sharing("4G", seed=2).ops
    assert (a == b).all() and not (len(a) == len(c) and (a == c).all())


def test_firmware_sharing_rejects():
    with pytest.raises(ValueError, match="style"):
        w.firmware_sharing("1G", style="sev")
    with pytest.raises(ValueError, match="nr_vcpus"):
        w.firmware_sharing("1G", nr_vcpus=-1)
    with pytest.raises(ValueError, match="low RAM"):
        w.firmware_sharing("2M")  # no room for the SWIOTLB
    with pytest.raises(ValueError, match="nr_vcpus"):
        w.firmware_sharing("128M", nr_vcpus=100_000)
    with pytest.raises(TypeError, match="dma_buffers"):
        w.firmware_sharing("1G", dma_buffers=1.5)  # type: ignore[arg-type]


@given(
    st.lists(
        st.tuples(st.integers(0, 1 << 20), st.integers(1, 1 << 17)),
        min_size=1,
        max_size=8,
    ),
    st.sampled_from(["tdx", "snp"]),
)
def test_split_requests_tile_each_range(ranges, style):
    starts = np.array([a * 4096 for a, _ in ranges], dtype=np.uint64)
    ends = starts + np.array([n * 4096 for _, n in ranges], dtype=np.uint64)
    gpa, size = w.split_requests(starts, ends, style)
    assert (size > 0).all()
    # requests tile the ranges, in order
    pos = 0
    for s, e in zip(starts.tolist(), ends.tolist()):
        a = s
        while a < e:
            assert int(gpa[pos]) == a
            if style == "tdx":
                assert int(size[pos]) == min(w.SZ_2M, e - a)
            else:
                assert psc_entries(a, int(size[pos])) <= 253
                # maximal: either the range ends or the run has 253 entries
                if a + int(size[pos]) < e:
                    assert psc_entries(a, int(size[pos])) == 253
            a += int(size[pos])
            pos += 1
        assert a == e
    assert pos == len(gpa)


def test_split_requests_skips_empty_and_rejects_reversed():
    s = np.array([0x1000, 0x5000], np.uint64)
    gpa, size = w.split_requests(s, s + np.array([0, 0x1000], np.uint64), "snp")
    assert gpa.tolist() == [0x5000] and size.tolist() == [0x1000]
    with pytest.raises(ValueError, match="end"):
        w.split_requests(s, s - np.uint64(0x1000), "tdx")
    with pytest.raises(ValueError, match="style"):
        w.split_requests(s, s, "sev")


# --------------------------------------------------------------------------
# acceptance and implicit conversions


def test_lazy_acceptance_shape():
    lay = w.GuestLayout.build("8G")
    excl = w.SharedSet.of(np.array([w.SZ_2M * 3], np.uint64), np.array([w.SZ_2M * 3 + 4096], np.uint64))
    eligible = lay.ram_size // w.ACCEPT_CHUNK - 1
    tr = w.lazy_acceptance(lay, 0.25, exclude=excl, seed=5)
    f = faults(tr)
    assert (f["flags"] == FLAG_PRIVATE | FLAG_WRITE).all()
    chunks = f["gpa"][0::2]
    assert (f["gpa"][1::2] == chunks + w.SZ_2M).all()
    assert (chunks % w.ACCEPT_CHUNK == 0).all()
    assert len(chunks) == round(0.25 * eligible) == tr.meta["params"]["chunks"]
    assert len(set(chunks.tolist())) == len(chunks)
    assert not ((chunks <= w.SZ_2M * 3) & (chunks + w.ACCEPT_CHUNK > w.SZ_2M * 3)).any()
    seq = faults(w.lazy_acceptance(lay, 1.0, order="sequential"))
    assert len(seq) == 2 * lay.ram_size // w.ACCEPT_CHUNK
    assert (np.diff(seq["gpa"].astype(np.int64)) > 0).all()


def test_lazy_acceptance_rejects():
    with pytest.raises(ValueError, match="fraction"):
        w.lazy_acceptance("1G", 1.5)
    with pytest.raises(ValueError, match="order"):
        w.lazy_acceptance("1G", order="backwards")


def test_implicit_conversions_shape():
    excl = w.SharedSet.of(np.array([0], np.uint64), np.array([GiB], np.uint64))
    tr = w.implicit_conversions("2G", count=100, exclude=excl, seed=1)
    f = faults(tr)
    assert len(f) == 100 and (f["flags"] == FLAG_WRITE | FLAG_CONVERT).all()
    assert (f["gpa"] % 4096 == 0).all() and (f["gpa"] >= GiB).all()
    assert len(set((f["gpa"] // (64 * KiB)).tolist())) == 100
    assert tr.shared.bytes == 100 * 4096
    with pytest.raises(ValueError, match="count"):
        w.implicit_conversions("4M", count=1000)


# --------------------------------------------------------------------------
# churn and kexec


@pytest.mark.parametrize("guest,fraction", [("4G", 0.075), ("16G", 0.15)])
def test_churn_shape(guest, fraction):
    lay = w.GuestLayout.build(guest)
    excl = w.SharedSet.of(np.array([GiB], np.uint64), np.array([GiB + 64 * MiB], np.uint64))
    tr = w.churn(lay, fraction, turnover=1.0, exclude=excl, seed=7)
    ops = tr.ops
    live: dict[int, int] = {}
    live_bytes = peak = 0
    bounds = np.array([(r.gpa, r.end) for r in lay.regions])
    prev_birth = None
    for op in ops.tolist():
        gpa, size, attrs, kind, flags = op[0], op[1], op[2], op[5], op[6]
        if kind == OP_FAULT:
            # a touch follows its birth
            assert prev_birth == gpa and flags == FLAG_WRITE
            prev_birth = None
            continue
        prev_birth = None
        assert size in {4096 << o for o in w.CHURN_ORDERS} and gpa % size == 0
        assert ((bounds[:, 0] <= gpa) & (gpa + size <= bounds[:, 1])).any()
        assert not (gpa < GiB + 64 * MiB and gpa + size > GiB)
        if attrs == 0:
            assert gpa not in live
            live[gpa] = size
            live_bytes += size
            prev_birth = gpa
        else:
            assert attrs == P and live.pop(gpa) == size
            live_bytes -= size
        peak = max(peak, live_bytes)
    # no two live buffers ever overlap: checked at the end on the survivors
    starts = np.array(sorted(live), dtype=np.int64)
    ends = starts + np.array([live[s] for s in sorted(live)], dtype=np.int64)
    assert (starts[1:] >= ends[:-1]).all()
    assert tr.shared.bytes == sum(live.values())
    target = fraction * lay.ram_size - 64 * MiB
    assert 0.6 * target < peak < 1.6 * target
    pop = int(w.churn_population(lay.ram_size, 64 * MiB, fraction).sum())
    births = int(((ops["kind"] == OP_SET_MEMORY_ATTRIBUTES) & (ops["attributes"] == 0)).sum())
    assert abs(births - 2 * pop) <= len(w.CHURN_ORDERS)


def test_churn_buffers_never_overlap_while_live():
    tr = w.churn("2G", 0.2, turnover=3.0, seed=11)
    pages = Pages(2 * GiB, P)
    for op in sets(tr).tolist():
        gpa, size, attrs = op[0], op[1], op[2]
        cur = pages.a[gpa // 4096 : (gpa + size) // 4096]
        # a birth finds the buffer private, a death finds it shared
        assert (cur == (P if attrs == 0 else 0)).all()
        cur[:] = attrs


def test_churn_rejects():
    with pytest.raises(ValueError, match="shared_fraction"):
        w.churn("1G", 0.9)
    with pytest.raises(ValueError, match="orders"):
        w.churn("1G", orders=(10,), weights=(1.0,))
    with pytest.raises(ValueError, match="weights"):
        w.churn("1G", orders=(0, 1), weights=(0.0, 0.0))
    with pytest.raises(ValueError, match="turnover"):
        w.churn("1G", turnover=-1)
    with pytest.raises(ValueError, match="free 2 MiB blocks"):
        w.churn("64M", 0.5)


@pytest.mark.parametrize("style", ["tdx", "snp"])
def test_kexec_converts_every_shared_range(style):
    shared = w.SharedSet.of(
        np.array([0x1000, 0x3000, 64 * MiB], np.uint64), np.array([0x3000, 0x5000, 64 * MiB + 600 * MiB], np.uint64)
    )
    tr = w.kexec("1G", shared, style)
    s = sets(tr)
    assert (s["attributes"] == P).all()
    assert int(s["size"].sum()) == shared.bytes
    # adjacent ranges were merged: the first request starts at 0x1000 and
    # covers 16 KiB in one go
    assert int(s["gpa"][0]) == 0x1000 and int(s["size"][0]) == 0x4000
    assert tr.shared.bytes == 0
    with pytest.raises(TypeError, match="shared"):
        w.kexec("1G", [(0, 4096)], style)  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# checkerboard


@pytest.mark.parametrize("exact", [False, True])
def test_checkerboard_counts_and_bounds(exact):
    tr = w.checkerboard(nr_vcpus=3, iterations=2, exact=exact, seed=1)
    odd_per_iter = 256 * 2 if not exact else 0  # two 2M ranges, 256 odd pages each
    per_vcpu_sets = 2 * (5 * 3 + odd_per_iter)
    per_vcpu_faults = 2 * (5 * 3 + odd_per_iter)
    assert len(sets(tr)) == 3 * per_vcpu_sets
    assert len(faults(tr)) == 3 * per_vcpu_faults
    per_cpu = 4 * MiB
    for v in range(3):
        base = w.BASE_DATA_GPA + v * per_cpu
        mine = tr.ops[(tr.ops["gpa"] >= base) & (tr.ops["gpa"] < base + per_cpu)]
        assert len(mine) == per_vcpu_sets + per_vcpu_faults
        # the vCPU's own stream keeps its order: it starts with a shared
        # fault and a private conversion of (0, 4K)
        assert int(mine[0]["kind"]) == OP_FAULT and int(mine[1]["attributes"]) == P
        assert int(mine[1]["size"]) == 4096 and int(mine[1]["gpa"]) == base
        assert int(mine[-1]["size"]) == w.PER_CPU_DATA_SIZE
    # end state: everything shared again
    pages = Pages(w.BASE_DATA_GPA + 3 * per_cpu, 0)
    pages.apply(tr)
    assert (pages.a == 0).all()


def test_checkerboard_rejects_small_guest():
    with pytest.raises(ValueError, match="checkerboard"):
        w.checkerboard("2G")
    with pytest.raises(ValueError, match="nr_vcpus"):
        w.checkerboard(nr_vcpus=0)


# --------------------------------------------------------------------------
# composite


def test_boot_and_churn_phases_and_end_state():
    tr = w.boot_and_churn("6G", nr_vcpus=4, dma_buffers=8, accept_fraction=0.5, implicit=16, seed=2)
    names = [n for n, _, _ in tr.phases]
    assert names == ["setup", "creation", "sharing", "acceptance", "implicit", "churn", "kexec"]
    pos = 0
    for _, a, b in tr.phases:
        assert a == pos and b >= a
        pos = b
    assert pos == len(tr)
    tr.validate()
    lay = w.GuestLayout.build("6G")
    pages = Pages(4 * GiB + 4 * GiB, 0)
    pages.apply(tr)
    # implicit conversions happen on replay (fault exits): the generator's
    # kexec converts their pages back, so with the sets alone RAM ends private
    for r in lay.regions:
        assert (pages.a[r.gpa // 4096 : r.end // 4096] == P).all()
    imp = tr.ops[tr.phases[4][1] : tr.phases[4][2]]
    assert (imp["flags"] == FLAG_WRITE | FLAG_CONVERT).all() and len(imp) == 16


def test_boot_and_churn_is_deterministic():
    a = w.boot_and_churn("4G", seed=9)
    b = w.boot_and_churn("4G", seed=9)
    c = w.boot_and_churn("4G", seed=10)
    assert (a.ops == b.ops).all() and a.meta == b.meta
    assert not (len(a) == len(c) and (a.ops == c.ops).all())


def test_boot_and_churn_scales_to_a_terabyte_quickly():
    tr = w.boot_and_churn("1T")
    assert len(tr) > 1_000_000
    churn = tr.ops[tr.phases[5][1] : tr.phases[5][2]]
    assert (churn["size"][churn["kind"] == OP_SET_MEMORY_ATTRIBUTES] <= w.SZ_2M).all()


def test_make_named_workloads():
    for name in w.WORKLOADS:
        guest = "4G" if name != "checkerboard" else None
        tr = w.make(name, guest) if guest else w.make(name)
        tr.validate()
        assert tr.phases[0][0] == "setup"
        assert tr.meta["name"] == name
    with pytest.raises(ValueError, match="unknown workload"):
        w.make("nope", "1G")


@pytest.mark.parametrize("store", ["rangetree", "xarray"])
def test_discard_punches_a_hole_after_every_conversion_to_shared(store):
    from memattr import trace as t
    from memattr.vm import Vm

    plain = w.make("boot-and-churn", "6G", seed=2)
    tr = w.make("boot-and-churn", "6G", seed=2, discard=True)
    ops, base = tr.ops, plain.ops
    to_shared = (base["kind"] == t.OP_SET_MEMORY_ATTRIBUTES) & (base["attributes"] == 0)
    holes = ops[ops["kind"] == t.OP_GUEST_MEMFD_FALLOCATE]
    assert len(tr) == len(plain) + int(to_shared.sum()) == len(plain) + len(holes)
    # Each hole follows its conversion, at the range's guest_memfd offset.
    after = np.flatnonzero(ops["kind"] == t.OP_GUEST_MEMFD_FALLOCATE)
    conv = ops[after - 1]
    assert (conv["kind"] == t.OP_SET_MEMORY_ATTRIBUTES).all() and (conv["attributes"] == 0).all()
    assert (holes["size"] == conv["size"]).all() and (holes["arg"] == 3).all()
    layout = w.GuestLayout.build("6G")
    for c, h in zip(conv[:50], holes[:50]):
        (r,) = [r for r in layout.regions if r.gpa <= int(c["gpa"]) < r.end]
        assert int(h["gpa"]) == r.guest_memfd_offset + int(c["gpa"]) - r.gpa
    # Phases keep their operations, holes included.
    assert [n for n, _, _ in tr.phases] == [n for n, _, _ in plain.phases]
    assert tr.phases[-1][2] == len(tr)
    for (_, a, b), (_, pa, pb) in zip(tr.phases, plain.phases):
        part = ops[a:b]
        assert int((part["kind"] != t.OP_GUEST_MEMFD_FALLOCATE).sum()) == pb - pa
    # Replayed: every hole punched, nothing fails, same attributes as without.
    vm, vm0 = Vm(tr.vm_type, store, **tr.meta["vm_kwargs"]), Vm(plain.vm_type, store, **plain.meta["vm_kwargs"])
    res = t.replay(tr, vm)
    t.replay(plain, vm0)
    # The replayer's implicit conversions (all to shared here) punch theirs.
    converted = (ops["kind"] == t.OP_FAULT) & ((ops["flags"] & t.FLAG_CONVERT) != 0)
    assert ((ops["flags"][converted] & t.FLAG_DISCARD) != 0).all()
    assert res.implicit_conversions > 0
    assert not res.errors and vm.stats.gmem_holes_punched == len(holes) + res.implicit_conversions
    assert list(vm.store.runs(0, 3 << 20)) == list(vm0.store.runs(0, 3 << 20))
    with pytest.raises(TypeError, match="discard"):
        w.make("churn", "6G", discard="yes")
