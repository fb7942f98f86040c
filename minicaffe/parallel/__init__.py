"""Data-parallel training: one solver per process, gradients averaged over MPI or NCCL
(data_parallel.py), and pycaffe's multi-GPU set-up calls."""
from .data_parallel import (AllReduceSync, Communicator, LocalComm, MPIComm, NCCLComm, ParallelSolver,  # noqa: F401
                            communicator, launched_as_worker, mpi_world_size, multiprocess, nccl_available,
                            set_multiprocess, set_solver_count, set_solver_rank, setup_worker, solver_count,
                            solver_rank, spawn_gpu_workers, start_worker)
