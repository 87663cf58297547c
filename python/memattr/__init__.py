"""memattr: a user-space model of Linux KVM per-page memory attributes."""

from memattr import _native
from memattr._native import MapleTree, RangeTree, XArray  # stores

__all__ = ["_native"]
__all__ += ["MapleTree", "RangeTree", "XArray"]

# The KVM model (VM workstream): uapi constants and structures, the Vm.
from memattr import uapi as _uapi  # noqa: E402
from memattr.errors import GuestMemfdSigbus, KvmBugError, LockdepError, MemoryFault  # noqa: E402
from memattr.gfn_range import GfnRange  # noqa: E402
from memattr.host import HostProfile  # noqa: E402
from memattr.memslots import Memslot  # noqa: E402
from memattr.stats import Stats  # noqa: E402
from memattr.uapi import *  # noqa: E402,F401,F403
from memattr.vm import Vm  # noqa: E402

__all__ += list(_uapi.__all__)
__all__ += ["GfnRange", "GuestMemfdSigbus", "HostProfile", "KvmBugError", "LockdepError", "Memslot", "MemoryFault", "Stats", "Vm"]

# The x86 MMU model (MMU workstream): hugepage tracking, the TDP page table, faults.
from memattr._native import LpageInfoTracker, RangeHugepageTracker, TdpPageTable  # noqa: E402
from memattr.mmu import PG_LEVEL_1G, PG_LEVEL_2M, PG_LEVEL_4K, X86Mmu  # noqa: E402

# The page table's first name ("stage 2" is ARM's word; x86 says TDP): the
# same class, kept so code written against it still runs.
Stage2Map = TdpPageTable

__all__ += [
    "LpageInfoTracker",
    "PG_LEVEL_1G",
    "PG_LEVEL_2M",
    "PG_LEVEL_4K",
    "RangeHugepageTracker",
    "Stage2Map",
    "TdpPageTable",
    "X86Mmu",
]

# Workloads, traces and sweeps (WORKLOADS workstream).
from memattr import sweep, trace, workloads  # noqa: E402
from memattr.trace import Recorder, Trace, TraceFormatError, replay  # noqa: E402

__all__ += ["Recorder", "Trace", "TraceFormatError", "replay", "sweep", "trace", "workloads"]
