"""parallel: MPI data parallelism (and ZeRO-1) over mpi4py, the same code at world size 1 without mpirun.

    >>> from parallel import get_world
    >>> comm = get_world()     # the MPI world under mpirun, else a one-process stand-in
    >>> comm.size >= 1
    True

Run programs under ``mpirun -n N python -m mpi4py prog.py`` so an exception on
one rank ends the whole job (see ``parallel.launch``).

- ``comm``: ``Communicator`` (allreduce, bcast, allgather, reduce_scatter, send/recv,
  isend/irecv, split), ``get_world``, ``make_grid`` (dp x pp sub-groups)
- ``ddp``: ``DataParallel`` (bucketed, overlapped gradient all-reduce), ``global_token_count``,
  ``agree_found_inf``
- ``zero``: ``ShardedMasters`` (ZeRO stage 1: master weights and optimizer state sharded over the replicas)
- ``launch``: ``install_excepthook``, ``abort_on_error``, ``rank0_print``, ``is_rank0``, ``run_under_mpirun``

mpi4py is imported only when a communicator over MPI is built, never at import.
"""

from .comm import Communicator, Grid, Request, cuda_aware_mpi, get_world, make_grid
from .ddp import DataParallel, agree_found_inf, assign_buckets, check_replicas_agree, global_token_count
from .launch import abort_on_error, install_excepthook, is_rank0, rank0_print, run_under_mpirun
from .zero import FlatLayout, ShardedMasters

__all__ = [
    "Communicator", "Request", "Grid", "get_world", "make_grid", "cuda_aware_mpi",
    "DataParallel", "assign_buckets", "check_replicas_agree", "global_token_count", "agree_found_inf",
    "ShardedMasters", "FlatLayout",
    "install_excepthook", "abort_on_error", "is_rank0", "rank0_print", "run_under_mpirun",
]
