"""Sweeps and fleets on a Dask cluster (the optional ``memattr[dask]`` extra).

``memattr compare`` and ``memattr fleet`` take ``--scheduler ADDRESS`` (a
running ``dask.distributed`` scheduler, e.g. ``tcp://10.0.0.1:8786``; every
worker needs ``memattr`` installed) or ``--dask-local N`` (a
``LocalCluster`` of N single-threaded worker processes on this machine,
started and stopped with the command). Either way the runs go through
``distributed.Client.get_executor()``, a standard
``concurrent.futures.Executor``, so :func:`memattr.sweep.sweep` is the
same loop as with the default process pool, and the results are the same
(every run is seeded and independent).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

INSTALL_HINT = "pip install 'memattr[dask]'"


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help=f"run on a dask.distributed scheduler at ADDRESS (tcp://host:8786; {INSTALL_HINT})",
    )
    g.add_argument(
        "--dask-local",
        type=int,
        metavar="N",
        help=f"start a dask LocalCluster of N worker processes for the runs ({INSTALL_HINT})",
    )


def _import_distributed() -> Any:
    try:
        import distributed
    except ImportError:
        raise ValueError(f"a Dask cluster needs dask.distributed, which is not installed: {INSTALL_HINT}") from None
    return distributed


@contextmanager
def dask_executor(scheduler: str | None = None, local_workers: int | None = None) -> Iterator[cf.Executor]:
    """A ``concurrent.futures.Executor`` on a Dask cluster: the scheduler at
    ``scheduler``, or a LocalCluster of ``local_workers`` processes (one
    thread each), closed on exit."""
    distributed = _import_distributed()
    if scheduler is not None:
        client = distributed.Client(scheduler)
        cluster = None
    else:
        if not isinstance(local_workers, int) or local_workers < 1:
            raise ValueError(f"--dask-local needs a worker count >= 1, got {local_workers!r}")
        cluster = distributed.LocalCluster(
            n_workers=local_workers, threads_per_worker=1, processes=True, dashboard_address=None
        )
        client = distributed.Client(cluster)
    try:
        # pure=False: two equal configurations are two runs, not one cached.
        yield client.get_executor(pure=False)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


@contextmanager
def executor_from_args(args: argparse.Namespace) -> Iterator[cf.Executor | None]:
    """The executor ``--scheduler`` / ``--dask-local`` ask for, or None
    (the caller's default process pool)."""
    scheduler = getattr(args, "scheduler", None)
    local = getattr(args, "dask_local", None)
    if scheduler is None and local is None:
        yield None
        return
    with dask_executor(scheduler, local) as ex:
        yield ex


def describe(args: argparse.Namespace) -> str:
    if getattr(args, "scheduler", None):
        return f"dask scheduler {args.scheduler}"
    if getattr(args, "dask_local", None):
        return f"dask LocalCluster of {args.dask_local} processes"
    return "local process pool"


__all__ = ["INSTALL_HINT", "add_cluster_args", "dask_executor", "describe", "executor_from_args"]
