"""All of psa-dist's ``torch.distributed`` handling: where the ranks come from, the process group,
the DDP wrapper, and the few collectives the trainers and evaluators need.

A rank learns its place from the environment, whichever launcher started it:

* submitit (``local`` or ``slurm`` launcher): the job environment gives rank, world size, local
  rank and the nodes; the master is the first node (``PSA_MASTER_ADDR`` overrides it, e.g. for
  simulated SLURM nodes whose names do not resolve);
* torchrun: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``;
* nothing (``inline``): a single process, no process group.

NCCL on CUDA, gloo on CPU. SyncBatchNorm only on CUDA (it has no CPU kernel).
"""
from __future__ import annotations

import gc
import os
import random
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def submitit_env() -> dict | None:
    """Rank variables from a submitit job, or None outside one."""
    if "SUBMITIT_EXECUTOR" not in os.environ and "SUBMITIT_LOCAL_JOB_ID" not in os.environ:
        return None
    import submitit
    try:
        env = submitit.JobEnvironment()
    except RuntimeError:
        return None
    master = os.environ.get("PSA_MASTER_ADDR") or env.hostnames[0]
    # The same port on every rank and on a requeued run of the same job: derived from the job id.
    port = os.environ.get("PSA_MASTER_PORT") or str(random.Random(str(env.job_id)).randint(20000, 59999))
    return {"RANK": str(env.global_rank), "WORLD_SIZE": str(env.num_tasks),
            "LOCAL_RANK": str(env.local_rank),
            "LOCAL_WORLD_SIZE": str(max(1, env.num_tasks // max(1, env.num_nodes))),
            "MASTER_ADDR": master, "MASTER_PORT": port}


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group this process belongs to (if any) and pick its device.

    ``device``: "auto" (CUDA when present, else CPU), "cuda" or "cpu". With CUDA each rank takes
    the GPU of its local rank.
    """
    env = submitit_env()
    if env is not None:
        os.environ.update(env)
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    return DistInfo(rank, world, local, dev)


def cpu_threads(loader_workers: int, threads: int | None = None) -> int:
    """Intra-op threads for a CPU rank: ``threads`` when set, else OMP_NUM_THREADS when set
    (torchrun sets it to 1 for several ranks a node), else this rank's share of the CPUs it may
    run on (SLURM_CPUS_PER_TASK, or the affinity mask split among the node's LOCAL_WORLD_SIZE
    ranks, which torchrun sets and ``init_distributed`` sets from submitit) less one per loader
    worker; at least 1. A step's threads and the loader workers on more threads than cores slow
    each other, and a worker with a core to itself may leave most of it idle: on 2 cores the demo's
    classifier trained at 54 img/s with 1 thread + 1 worker, 74 with 2 + 1 and 79 with 2 threads
    and no worker (its loader needs a fifth of a step; docs/benchmark.md round 14)."""
    if threads:
        return threads
    omp = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()   # "4,2": nested levels
    if omp.isdigit():
        return max(1, int(omp))
    if os.environ.get("SLURM_CPUS_PER_TASK"):
        cpus = int(os.environ["SLURM_CPUS_PER_TASK"])
    else:
        mask = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
        cpus = len(mask) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return max(1, cpus - loader_workers)


def cleanup(failed: bool = False) -> None:
    """Leave the process group. Garbage-collecting first avoids gloo's abort at interpreter exit
    ("terminate called without an active exception") seen with torchrun on this kind of machine.
    A rank that ``failed`` leaves without the barrier: its peers may never reach it (they wait in
    a collective of the step, or failed elsewhere), and a barrier would hold the failed rank, and
    with it the job and every later step of a chain, for the process group's whole timeout
    (30 minutes) instead of ending it."""
    gc.collect()
    if dist.is_initialized():
        if not failed:
            dist.barrier()
        dist.destroy_process_group()


def wrap_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    """``model`` as the forward pass should see it: DDP across ranks (SyncBN on CUDA)."""
    if not info.distributed:
        return model
    if info.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return nn.parallel.DistributedDataParallel(model, device_ids=[info.device.index])
    return nn.parallel.DistributedDataParallel(model)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, src: int = 0):
    """``obj`` as rank ``src`` has it, on every rank (itself where there is no process group)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
