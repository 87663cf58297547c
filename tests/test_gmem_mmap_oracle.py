"""Host access to guest_memfd contents through its mmap, under Linux 6.18
and the in-place conversion series (v8 "gmem-inplace", v5
"gmem-inplace-v5" with its content modes), against an independent per-page
oracle: numpy arrays of the file's bytes, per-page attributes, folios and
host mappings, driven at random through both Python faces of the one core
path (``vm.guest_memfd_mmap()``'s mapping and ``vm.guest_memfd_read/write``).

The oracle's rules, written from the kernel and not from the model:
- a copy goes page by page; page p faults first (kvm_gmem_fault_user_mapping):
  SIGBUS past the end of the file, on 6.18 SIGBUS unless the file was
  created INIT_SHARED, under the series SIGBUS on a private page;
- a SIGBUS on page N stops the copy: pages before N were faulted in (folio
  allocated, host-mapped) and a write already stored its bytes there (a
  memcpy into a MAP_SHARED mapping cannot take them back);
- a hole punch drops folios, bytes and host mappings, never attributes;
- a conversion to private unmaps the host; v5's ZERO zeroes and UNSPECIFIED
  (SW_PROTECTED) scrambles the allocated pages of the range, even when
  nothing converts; PRESERVE keeps them; ZERO to private is EOPNOTSUPP.
"""

from __future__ import annotations

import errno

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import memattr as m

P = m.KVM_MEMORY_ATTRIBUTE_PRIVATE
PG = m.PAGE_SIZE
MMAP = m.GUEST_MEMFD_FLAG_MMAP
INIT_SHARED = m.GUEST_MEMFD_FLAG_INIT_SHARED
ZERO = m.KVM_SET_MEMORY_ATTRIBUTES2_ZERO
PRESERVE = m.KVM_SET_MEMORY_ATTRIBUTES2_PRESERVE
PUNCH = m.FALLOC_FL_PUNCH_HOLE | m.FALLOC_FL_KEEP_SIZE
N = 8  # pages per file
MAP_LEN = (N + 2) * PG  # each mapping reaches two pages past the end

# Copies start anywhere in a page (its edges often) and run over up to three
# more pages, so they often cross into a page that faults.
in_page = st.one_of(st.sampled_from([0, 1, PG - 1]), st.integers(0, PG - 1))
offsets = st.builds(lambda p, d: p * PG + d, st.integers(0, N + 1), in_page)
lengths = st.builds(lambda k, e: k * PG + e, st.integers(0, 3), in_page)


def pattern(n: int, seed: int) -> bytes:
    return ((np.arange(n, dtype=np.uint64) * 7 + seed) % 251 + 1).astype(np.uint8).tobytes()


class OracleFile:
    """One file as the oracle sees it."""

    def __init__(self, fd: int, init_shared: bool) -> None:
        self.fd = fd
        self.init_shared = init_shared
        self.data = np.zeros(N * PG, dtype=np.uint8)
        self.known = np.ones(N * PG, dtype=bool)  # False: scrambled, any bytes
        self.private = np.full(N, not init_shared)
        self.allocated = np.zeros(N, dtype=bool)
        self.mapped = np.zeros(N, dtype=bool)


class HostAccessVsOracle(RuleBasedStateMachine):
    SEMANTICS = "6.18"

    def __init__(self) -> None:
        super().__init__()
        self.inplace = self.SEMANTICS.startswith("gmem-inplace")
        self.v5 = self.SEMANTICS == "gmem-inplace-v5"
        # 6.18 offers INIT_SHARED only to VMs without private memory.
        vm_type = m.KVM_X86_SW_PROTECTED_VM if self.inplace else m.KVM_X86_DEFAULT_VM
        self.vm = m.Vm(vm_type, semantics=self.SEMANTICS)  # type: ignore[arg-type]
        self.files = []
        self.maps = []
        for init_shared in (True, False):
            fd = self.vm.create_guest_memfd(N * PG, MMAP | (INIT_SHARED if init_shared else 0))
            self.files.append(OracleFile(fd, init_shared))
            self.maps.append(self.vm.guest_memfd_mmap(fd, MAP_LEN))
        self.sigbus = 0
        self.unmapped = 0

    # --- the oracle's copy ---------------------------------------------------

    def faultable(self, f: OracleFile, page: int) -> bool:
        if page >= N:
            return False
        if self.inplace:
            return not f.private[page]
        return f.init_shared

    def copy(self, f: OracleFile, off: int, n: int, src: bytes | None) -> tuple[int, bool] | None:
        """Applies a copy to the oracle; (offset, private) of its SIGBUS."""
        pos, end = off, off + n
        while pos < end:
            page = pos // PG
            if not self.faultable(f, page):
                return pos, self.inplace and page < N and bool(f.private[page])
            f.allocated[page] = f.mapped[page] = True
            upto = min(end, (page + 1) * PG)
            if src is not None:
                f.data[pos:upto] = np.frombuffer(src[pos - off:upto - off], dtype=np.uint8)
                f.known[pos:upto] = True
            pos = upto
        return None

    # --- rules ----------------------------------------------------------------

    @rule(i=st.integers(0, 1), off=offsets, n=lengths, seed=st.integers(0, 250), via_map=st.booleans())
    def write(self, i: int, off: int, n: int, seed: int, via_map: bool) -> None:
        f = self.files[i]
        n = min(n, MAP_LEN - off)
        data = pattern(n, seed)
        bus = self.copy(f, off, n, data)
        call = (lambda: self.maps[i].write(off, data)) if via_map else (
            lambda: self.vm.guest_memfd_write(f.fd, off, data))
        if bus is None:
            call()
            return
        self.sigbus += 1
        with pytest.raises(m.GuestMemfdSigbus) as e:
            call()
        assert (e.value.fd, e.value.offset, e.value.private) == (f.fd, *bus)

    @rule(i=st.integers(0, 1), off=offsets, n=lengths, via_map=st.booleans())
    def read_range(self, i: int, off: int, n: int, via_map: bool) -> None:
        self.read(i, off, n, via_map)

    def read(self, i: int, off: int, n: int, via_map: bool) -> None:
        f = self.files[i]
        n = min(n, MAP_LEN - off)
        bus = self.copy(f, off, n, None)
        call = (lambda: self.maps[i].read(off, n)) if via_map else (
            lambda: self.vm.guest_memfd_read(f.fd, off, n))
        if bus is None:
            got = np.frombuffer(call(), dtype=np.uint8)
            known = f.known[off:off + n]
            assert (got[known] == f.data[off:off + n][known]).all()
            return
        self.sigbus += 1
        with pytest.raises(m.GuestMemfdSigbus) as e:
            call()
        assert (e.value.fd, e.value.offset, e.value.private) == (f.fd, *bus)

    @rule(i=st.integers(0, 1), page=st.integers(0, N - 1), via_map=st.booleans())
    def read_page(self, i: int, page: int, via_map: bool) -> None:
        """A whole page: what every earlier copy left there."""
        self.read(i, page * PG, PG, via_map)

    @rule(i=st.integers(0, 1), a=st.integers(0, N - 1), n=st.integers(1, N))
    def punch(self, i: int, a: int, n: int) -> None:
        f = self.files[i]
        b = min(N, a + n)
        self.vm.guest_memfd_fallocate(f.fd, PUNCH, a * PG, (b - a) * PG)
        f.data[a * PG:b * PG] = 0
        f.known[a * PG:b * PG] = True
        f.allocated[a:b] = f.mapped[a:b] = False

    @rule(i=st.integers(0, 1), a=st.integers(0, N - 1), n=st.integers(1, N))
    def allocate(self, i: int, a: int, n: int) -> None:
        f = self.files[i]
        b = min(N, a + n)
        self.vm.guest_memfd_fallocate(f.fd, m.FALLOC_FL_KEEP_SIZE, a * PG, (b - a) * PG)
        f.allocated[a:b] = True

    @rule(i=st.integers(0, 1), a=st.integers(0, N - 1), n=st.integers(1, N), private=st.booleans(),
          mode=st.sampled_from([0, ZERO, PRESERVE]))
    def convert(self, i: int, a: int, n: int, private: bool, mode: int) -> None:
        f = self.files[i]
        b = min(N, a + n)
        flags = mode if self.v5 else 0
        call = lambda: self.vm.guest_memfd_set_memory_attributes(  # noqa: E731
            f.fd, a * PG, (b - a) * PG, P if private else 0, flags)
        if not self.inplace:
            with pytest.raises(OSError) as e:
                call()
            assert e.value.errno == errno.ENOTTY  # no such ioctl on 6.18
            return
        if flags == ZERO and private:
            with pytest.raises(OSError) as e:
                call()
            assert e.value.errno == errno.EOPNOTSUPP
            return
        call()
        if private:
            self.unmapped += int(f.mapped[a:b].sum())
            f.mapped[a:b] = False
        f.private[a:b] = private
        if self.v5 and flags != PRESERVE:
            # ZERO zeroes, UNSPECIFIED scrambles (SW_PROTECTED): the
            # allocated pages of the whole range, converted or not.
            for p in np.flatnonzero(f.allocated[a:b]) + a:
                f.data[p * PG:(p + 1) * PG] = 0
                f.known[p * PG:(p + 1) * PG] = flags == ZERO

    @precondition(lambda self: self.inplace)
    @rule(i=st.integers(0, 1), a=st.integers(0, N + 1), n=st.integers(1, 3))
    def pin(self, i: int, a: int, n: int) -> None:
        """GUP faults through the same rule: EFAULT where the copy would get
        SIGBUS (not counted as one), the pages before it faulted in."""
        f = self.files[i]
        bus = self.copy(f, a * PG, n * PG, None)
        if bus is not None:
            with pytest.raises(OSError) as e:
                self.vm.guest_memfd_pin(f.fd, a * PG, n)
            assert e.value.errno == errno.EFAULT
            assert self.vm.guest_memfd_pinned(f.fd) == []
            return
        self.vm.guest_memfd_pin(f.fd, a * PG, n)
        self.vm.guest_memfd_unpin(f.fd, a * PG, n)

    # --- invariants -------------------------------------------------------------

    @invariant()
    def counters_and_state_match(self) -> None:
        stats = self.vm.inplace_stats
        assert stats["sigbus"] == self.sigbus
        if not self.inplace:
            return
        assert stats["user_unmapped_pages"] == self.unmapped
        for f in self.files:
            got = np.zeros(N, dtype=bool)
            for s, e in self.vm.guest_memfd_allocated(f.fd):
                got[s:e] = True
            assert (got == f.allocated).all()
            attrs = np.zeros(N, dtype=bool)
            for s, e, v in self.vm.guest_memfd_attributes(f.fd):
                attrs[s:e] = v == P
            assert (attrs == f.private).all()


SETTINGS = settings(max_examples=60, stateful_step_count=40, deadline=None)


class On618(HostAccessVsOracle):
    SEMANTICS = "6.18"


class OnInplace(HostAccessVsOracle):
    SEMANTICS = "gmem-inplace"


class OnInplaceV5(HostAccessVsOracle):
    SEMANTICS = "gmem-inplace-v5"


TestOn618 = On618.TestCase
TestOn618.settings = SETTINGS
TestOnInplace = OnInplace.TestCase
TestOnInplace.settings = SETTINGS
TestOnInplaceV5 = OnInplaceV5.TestCase
TestOnInplaceV5.settings = SETTINGS


# --- the same partial write, step by step -------------------------------------------


@pytest.mark.parametrize("semantics", ["6.18", "gmem-inplace"])
def test_a_write_that_meets_sigbus_keeps_the_pages_before_it(semantics: str) -> None:
    """A write over pages 1-3 whose page 3 faults with SIGBUS (past the end
    on 6.18, private under the series) stores pages 1 and 2 and nothing of
    page 3, through either face; a read meeting the same page returns
    nothing but leaves the pages before it faulted in."""
    vm_type = m.KVM_X86_DEFAULT_VM if semantics == "6.18" else m.KVM_X86_SW_PROTECTED_VM
    vm = m.Vm(vm_type, semantics=semantics)  # type: ignore[arg-type]
    npages = 3 if semantics == "6.18" else 4
    fd = vm.create_guest_memfd(npages * PG, MMAP | INIT_SHARED)
    if semantics != "6.18":
        vm.guest_memfd_set_memory_attributes(fd, 3 * PG, PG, P)
    for k, write in enumerate([
        lambda off, d: vm.guest_memfd_mmap(fd, 5 * PG).write(off, d),
        lambda off, d: vm.guest_memfd_write(fd, off, d),
    ]):
        data = bytes([k + 1]) * (3 * PG)
        with pytest.raises(m.GuestMemfdSigbus) as e:
            write(PG, data)
        assert e.value.offset == 3 * PG
        assert e.value.private == (semantics != "6.18")
        assert vm.guest_memfd_read(fd, PG, 2 * PG) == data[: 2 * PG]
        assert vm.guest_memfd_read(fd, 0, PG) == bytes(PG)
    if semantics != "6.18":
        vm.guest_memfd_set_memory_attributes(fd, 3 * PG, PG, 0)
        assert vm.guest_memfd_read(fd, 3 * PG, PG) == bytes(PG)
        assert vm.inplace_stats["sigbus"] == 2
        vm.guest_memfd_fallocate(fd, PUNCH, 0, npages * PG)
        vm.guest_memfd_set_memory_attributes(fd, 2 * PG, PG, P)
        with pytest.raises(m.GuestMemfdSigbus):
            vm.guest_memfd_read(fd, 0, 3 * PG)
        assert vm.guest_memfd_allocated(fd) == [(0, 2)]


@pytest.mark.parametrize("bad, exc", [
    (True, TypeError), (-1, ValueError), (1 << 64, ValueError), (1.0, TypeError), ("1", TypeError),
])
def test_bad_ints_get_the_same_errors_on_every_guest_memfd_call(bad: object, exc: type) -> None:
    """Every guest_memfd binding takes its integers through the one rule of
    rust/py/args.rs: the same exception type, naming the argument."""
    vm = m.Vm(m.KVM_X86_SW_PROTECTED_VM, semantics="gmem-inplace")
    fd = vm.create_guest_memfd(4 * PG, MMAP | INIT_SHARED)
    calls = [
        ("fd", lambda: vm.guest_memfd_read(bad, 0, 1)),  # type: ignore[arg-type]
        ("offset", lambda: vm.guest_memfd_read(fd, bad, 1)),  # type: ignore[arg-type]
        ("length", lambda: vm.guest_memfd_read(fd, 0, bad)),  # type: ignore[arg-type]
        ("offset", lambda: vm.guest_memfd_write(fd, bad, b"x")),  # type: ignore[arg-type]
        ("fd", lambda: vm.guest_memfd_pin(bad, 0)),  # type: ignore[arg-type]
        ("npages", lambda: vm.guest_memfd_pin(fd, 0, bad)),  # type: ignore[arg-type]
        ("npages", lambda: vm.guest_memfd_unpin(fd, 0, bad)),  # type: ignore[arg-type]
        ("fd", lambda: vm.guest_memfd_attributes(bad)),  # type: ignore[arg-type]
        ("offset", lambda: vm.guest_memfd_get_attributes(fd, bad)),  # type: ignore[arg-type]
        ("fd", lambda: vm.guest_memfd_allocated(bad)),  # type: ignore[arg-type]
        ("fd", lambda: vm.guest_memfd_pinned(bad)),  # type: ignore[arg-type]
        ("fd", lambda: vm.guest_memfd_store_usage(bad)),  # type: ignore[arg-type]
        ("size", lambda: vm.guest_memfd_set_memory_attributes(fd, 0, bad, P)),  # type: ignore[arg-type]
        ("reserved", lambda: vm.guest_memfd_set_memory_attributes(
            fd, 0, PG, P, 0, (bad,) + (0,) * 10)),  # type: ignore[arg-type]
    ]
    for name, call in calls:
        with pytest.raises(exc, match=name):
            call()
    # numpy integers are ints; nothing above changed the file.
    assert vm.guest_memfd_read(np.uint64(fd), np.int64(0), np.uint32(2)) == b"\0\0"  # type: ignore[arg-type]
    assert vm.guest_memfd_attributes(fd) == [(0, 4, 0)]
    assert vm.inplace_stats["sigbus"] == 0
    with pytest.raises(ValueError, match="reserved must hold 11"):
        vm.guest_memfd_set_memory_attributes(fd, 0, PG, P, 0, (0,) * 3)


def test_a_host_read_longer_than_the_cap_is_refused_before_allocating() -> None:
    """A host read returns at most 1 GiB (the core's MAX_USER_READ), through
    either face: a longer one is ValueError naming the length before any
    buffer is allocated or page faulted in, even on a file (and a mapping)
    big enough to hold it."""
    vm = m.Vm(m.KVM_X86_SW_PROTECTED_VM, semantics="gmem-inplace")
    size = 4 << 30
    fd = vm.create_guest_memfd(size, MMAP | INIT_SHARED)
    mapping = vm.guest_memfd_mmap(fd, size)
    for read in (lambda n: vm.guest_memfd_read(fd, 0, n), lambda n: mapping.read(0, n)):
        with pytest.raises(ValueError, match="length must be <= 0x40000000"):
            read((1 << 30) + 1)
    assert vm.guest_memfd_allocated(fd) == []
    assert vm.guest_memfd_read(fd, 0, 2) == b"\0\0"
    mapping.close()
