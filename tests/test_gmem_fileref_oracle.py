"""guest_memfd file references (closing the fd while a mapping lives),
under Linux 6.18 and the in-place series, against an independent per-page
oracle: numpy arrays of each file's bytes, attributes and the guest's
TDP mappings, plus the file's references as the kernel counts them.

The oracle's rules, written from the kernel (virt/kvm/guest_memfd.c,
mm/vma.c) and not from the model:
- the fd and every live mapping each hold a reference on the struct file
  (mmap: vma->vm_file = get_file(file); munmap: remove_vma() fputs it); a
  memslot binding holds none (kvm_gmem_bind() fputs at its end);
- kvm_gmem_release() runs at the last fput only: the bound slot loses the
  file (gmem_open false, a guest fault there exits to userspace), every
  guest mapping through it is zapped, gmem_closed counts one;
- until then the mappings read and write the same page cache, the binding
  stays, guest faults still map; calls on the closed fd are EBADF;
- accesses through an unmapped mapping raise ValueError (mmap.mmap's
  "closed" error); a page past the file's end, or (in place) a private
  page, SIGBUS.
"""

from __future__ import annotations

from collections.abc import Callable

import errno
import gc
import subprocess
import sys
import weakref

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import memattr as m

P = m.KVM_MEMORY_ATTRIBUTE_PRIVATE
PG = m.PAGE_SIZE
FLAGS = m.GUEST_MEMFD_FLAG_MMAP | m.GUEST_MEMFD_FLAG_INIT_SHARED
PUNCH = m.FALLOC_FL_PUNCH_HOLE | m.FALLOC_FL_KEEP_SIZE
N = 8  # pages per file
NFILES = 2
MAP_LEN = (N + 1) * PG  # one page past the end of the file
SLOT_GPA = 1 << 30  # file i is bound to slot i at gpa i * SLOT_GPA


class OracleFile:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.fd_open = True
        self.maps: list[m.GuestMemfdMapping] = []
        self.released = False
        self.data = np.zeros(N * PG, dtype=np.uint8)
        self.private = np.zeros(N, dtype=bool)  # INIT_SHARED
        self.guest_mapped = np.zeros(N, dtype=bool)

    def put(self) -> bool:
        """A reference went: is it released now?"""
        if not self.fd_open and not self.maps and not self.released:
            self.released = True
            self.guest_mapped[:] = False
            return True
        return False


class CloseWithMappingVsOracle(RuleBasedStateMachine):
    SEMANTICS = "6.18"

    def __init__(self) -> None:
        super().__init__()
        self.inplace = self.SEMANTICS.startswith("gmem-inplace")
        vm_type = m.KVM_X86_SW_PROTECTED_VM if self.inplace else m.KVM_X86_DEFAULT_VM
        self.vm = m.Vm(vm_type, semantics=self.SEMANTICS)  # type: ignore[arg-type]
        self.files: list[OracleFile] = []
        for i in range(NFILES):
            fd = self.vm.create_guest_memfd(N * PG, FLAGS)
            self.vm.set_user_memory_region(i, i * SLOT_GPA, N * PG, flags=m.KVM_MEM_GUEST_MEMFD, guest_memfd=fd)
            self.files.append(OracleFile(fd))
        self.closed = 0
        self.dead: list[m.GuestMemfdMapping] = []  # unmapped mapping objects

    def release_if_last(self, f: OracleFile) -> None:
        self.closed += f.put()

    @staticmethod
    def ebadf_if_closed(f: OracleFile, call: Callable[[], object]) -> bool:
        """An fd call on a file whose fd is closed: EBADF (the file may live
        on in a mapping). True if it was, and the rule is done."""
        if f.fd_open:
            return False
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == errno.EBADF
        return True

    # --- references ---------------------------------------------------------

    @rule(i=st.integers(0, NFILES - 1))
    def mmap(self, i: int) -> None:
        f = self.files[i]
        if self.ebadf_if_closed(f, lambda: self.vm.guest_memfd_mmap(f.fd, MAP_LEN)):
            return
        f.maps.append(self.vm.guest_memfd_mmap(f.fd, MAP_LEN))

    @rule(i=st.integers(0, NFILES - 1))
    def close_fd(self, i: int) -> None:
        f = self.files[i]
        if self.ebadf_if_closed(f, lambda: self.vm.guest_memfd_close(f.fd)):
            return
        self.vm.guest_memfd_close(f.fd)
        f.fd_open = False
        self.release_if_last(f)

    @precondition(lambda self: any(f.maps for f in self.files))
    @rule(data=st.data(), how=st.sampled_from(["close", "munmap", "with", "drop"]))
    def munmap(self, data: st.DataObject, how: str) -> None:
        f = data.draw(st.sampled_from([f for f in self.files if f.maps]))
        mp = f.maps.pop(data.draw(st.integers(0, len(f.maps) - 1)))
        if how == "close":
            mp.close()
        elif how == "munmap":
            mp.munmap()
        elif how == "with":
            with mp:
                pass
        else:
            # The last Python reference goes: the finalizer munmaps. (Should
            # the test machinery still hold one, close it; the finalizer has
            # its own deterministic test below.)
            assert not mp.closed
            ref = weakref.ref(mp)
            del mp
            gc.collect()
            held = ref()
            if held is not None:
                held.close()
            self.release_if_last(f)
            return
        assert mp.closed
        self.dead.append(mp)
        self.release_if_last(f)

    # --- accesses -------------------------------------------------------------

    def sigbus_page(self, f: OracleFile, off: int, n: int) -> int | None:
        for page in range(off // PG, (off + max(n, 1) - 1) // PG + 1):
            if page >= N or (self.inplace and f.private[page]):
                return page
        return None

    @precondition(lambda self: any(f.maps for f in self.files))
    @rule(data=st.data(), off=st.integers(0, MAP_LEN - 1), n=st.integers(1, 2 * PG), seed=st.integers(1, 250),
          write=st.booleans())
    def access(self, data: st.DataObject, off: int, n: int, seed: int, write: bool) -> None:
        f = data.draw(st.sampled_from([f for f in self.files if f.maps]))
        mp = data.draw(st.sampled_from(f.maps))
        n = min(n, MAP_LEN - off)
        bus = self.sigbus_page(f, off, n)
        src = bytes([seed]) * n
        if bus is not None:
            with pytest.raises(m.GuestMemfdSigbus):
                mp.write(off, src) if write else mp.read(off, n)
            if write:  # the pages before the faulting one took the bytes
                f.data[off:bus * PG] = seed
            return
        if write:
            mp.write(off, src)
            f.data[off:off + n] = seed
        assert mp.read(off, n) == f.data[off:off + n].tobytes()

    @precondition(lambda self: bool(self.dead))
    @rule(data=st.data())
    def access_unmapped(self, data: st.DataObject) -> None:
        mp = data.draw(st.sampled_from(self.dead))
        with pytest.raises(ValueError, match="closed"):
            mp.read(0, 1)
        with pytest.raises(ValueError, match="closed"):
            mp[0] = 1
        mp.close()  # a second close does nothing

    @rule(i=st.integers(0, NFILES - 1), a=st.integers(0, N - 1), k=st.integers(1, N))
    def punch(self, i: int, a: int, k: int) -> None:
        f = self.files[i]
        b = min(N, a + k)
        call = lambda: self.vm.guest_memfd_fallocate(f.fd, PUNCH, a * PG, (b - a) * PG)  # noqa: E731
        if self.ebadf_if_closed(f, call):
            return
        call()
        f.data[a * PG:b * PG] = 0
        f.guest_mapped[a:b] = False

    @precondition(lambda self: self.inplace)
    @rule(i=st.integers(0, NFILES - 1), a=st.integers(0, N - 1), k=st.integers(1, N), private=st.booleans())
    def convert(self, i: int, a: int, k: int, private: bool) -> None:
        f = self.files[i]
        b = min(N, a + k)
        call = lambda: self.vm.guest_memfd_set_memory_attributes(  # noqa: E731
            f.fd, a * PG, (b - a) * PG, P if private else 0)
        if self.ebadf_if_closed(f, call):
            return
        call()
        if (f.private[a:b] != private).any():
            # Something changed: the whole range's guest mappings go.
            f.guest_mapped[a:b] = False
        f.private[a:b] = private

    @rule(i=st.integers(0, NFILES - 1), page=st.integers(0, N - 1))
    def guest_fault(self, i: int, page: int) -> None:
        """The guest touches a page of slot i the way its attribute says."""
        f = self.files[i]
        gpa = i * SLOT_GPA + page * PG
        private = bool(f.private[page])
        if f.released:
            with pytest.raises(m.MemoryFault):
                self.vm.fault(gpa, private=private)
            return
        assert self.vm.fault(gpa, private=private) >= 1
        f.guest_mapped[page] = True

    # --- invariants -------------------------------------------------------------

    @invariant()
    def state_matches(self) -> None:
        assert self.vm.stats.gmem_closed == self.closed
        live = {fd for fd, *_ in self.vm.guest_memfds()}
        assert live == {f.fd for f in self.files if not f.released}
        for i, f in enumerate(self.files):
            slot = self.vm.memslots.find(0, (i * SLOT_GPA) >> 12)
            assert slot is not None
            # The binding lasts exactly as long as the file.
            assert (slot.gmem is not None) == (not f.released)
            got = np.array([self.vm.mmu.mapped_level(i * SLOT_GPA + p * PG) > 0 for p in range(N)])
            assert (got == f.guest_mapped).all()
            # The fd answers exactly while it is open.
            if f.fd_open:
                assert self.vm.guest_memfd_file(f.fd).fstat().st_size == N * PG
            else:
                with pytest.raises(OSError) as e:
                    self.vm.guest_memfd_file(f.fd)
                assert e.value.errno == errno.EBADF


SETTINGS = settings(max_examples=60, stateful_step_count=40, deadline=None)


class On618(CloseWithMappingVsOracle):
    SEMANTICS = "6.18"


class OnInplace(CloseWithMappingVsOracle):
    SEMANTICS = "gmem-inplace"


TestOn618 = On618.TestCase
TestOn618.settings = SETTINGS
TestOnInplace = OnInplace.TestCase
TestOnInplace.settings = SETTINGS


# --- the same story, step by step ---------------------------------------------


@pytest.mark.parametrize("semantics", ["6.18", "gmem-inplace"])
def test_close_with_a_live_mapping_then_munmap(semantics: str) -> None:
    vm_type = m.KVM_X86_DEFAULT_VM if semantics == "6.18" else m.KVM_X86_SW_PROTECTED_VM
    vm = m.Vm(vm_type, semantics=semantics)  # type: ignore[arg-type]
    fd = vm.create_guest_memfd(N * PG, FLAGS)
    vm.set_user_memory_region(0, 0, N * PG, flags=m.KVM_MEM_GUEST_MEMFD, guest_memfd=fd)
    assert vm.fault(0) == 1
    with vm.guest_memfd_mmap(fd, N * PG) as mp:
        mp.write(PG - 2, b"abcd")
        vm.guest_memfd_close(fd)
        # Only the fd went.
        assert mp.read(PG - 2, 4) == b"abcd"
        assert vm.stats.gmem_closed == 0 and vm.memslots.find(0, 0).gmem == fd  # type: ignore[union-attr]
        assert vm.mmu.mapped_level(0) == 1
        for call in (lambda: vm.guest_memfd_read(fd, 0, 1), lambda: vm.guest_memfd_mmap(fd, PG),
                     lambda: vm.guest_memfd_close(fd)):
            with pytest.raises(OSError) as e:
                call()
            assert e.value.errno == errno.EBADF
    # Leaving the block unmapped it: the release ran then.
    assert mp.closed and vm.stats.gmem_closed == 1
    assert vm.memslots.find(0, 0).gmem is None and vm.mmu.mapped_level(0) == 0  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="closed"):
        mp.read(0, 1)
    with pytest.raises(m.MemoryFault):
        vm.fault(0)


def test_a_dropped_mapping_is_unmapped_and_interpreter_exit_is_quiet() -> None:
    vm = m.Vm()
    fd = vm.create_guest_memfd(N * PG, FLAGS)
    vm.guest_memfd_mmap(fd, PG).write(0, b"x")  # dropped at once
    vm.guest_memfd_close(fd)
    assert vm.stats.gmem_closed == 1  # no mapping was left to hold the file
    # A mapping alive at exit: no munmap, no error, no output.
    code = ("import memattr as m; vm = m.Vm(); fd = vm.create_guest_memfd(4096, 3); "
            "mp = vm.guest_memfd_mmap(fd, 4096); vm.guest_memfd_close(fd); KEEP = (vm, mp)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")


def test_the_drivens_close_and_munmap_match_the_whole_operations() -> None:
    """The explorer's step-by-step close and munmap (memattr.driven): the
    same core steps decide when the release runs, so both paths end in the
    same state."""
    from memattr import driven

    def run(step_by_step: bool) -> tuple[object, ...]:
        vm = m.Vm()
        fd = vm.create_guest_memfd(N * PG, FLAGS)
        vm.set_user_memory_region(0, 0, N * PG, flags=m.KVM_MEM_GUEST_MEMFD, guest_memfd=fd)
        vm.fault(0)
        mp = vm.guest_memfd_mmap(fd, N * PG)
        vma = mp._vma
        assert vma is not None
        if step_by_step:
            driven.kvm_gmem_release(vm, fd)
        else:
            vm.guest_memfd_close(fd)
        kept = (vm.stats.gmem_closed, vm.mmu.mapped_level(0), vm.mmu_invalidate_seq)
        if step_by_step:
            mp._finalizer.detach()
            mp._vma = None
            driven.kvm_gmem_munmap(vm, vma)
            with pytest.raises(ValueError, match="not mapped"):
                driven.kvm_gmem_munmap(vm, vma)
        else:
            mp.close()
        return kept, vm.stats.gmem_closed, vm.mmu.mapped_level(0), vm.mmu_invalidate_seq, \
            vm.memslots.find(0, 0).gmem  # type: ignore[union-attr]

    whole, driven_ = run(False), run(True)
    assert whole == driven_
    assert whole[0][:2] == (0, 1) and whole[1:4] == (1, 0, whole[0][2] + 1) and whole[4] is None
