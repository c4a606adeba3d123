"""Several processes on one job, for evaluate.py and search.py: under torchrun, or started by the tool
itself with --workers K (K local processes wired as torchrun wires them). Work is split by item index
(a batch of images, a schedule to evaluate) and rank 0 combines the parts in index order, so any number
of processes gives a one-process run's result. Only Python objects travel (timings, scores, features),
so the group is gloo on CPU and GPU runs alike.

    shard = Shard.start(args)                      # joins the group; threads = cores / local processes
    parts = shard.batches(n, size, work)           # [work(start, stop), ...] on rank 0, None elsewhere
"""
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing


def add_worker_flag(p):
    p.add_argument("--workers", type=int, default=1,
                   help="local processes sharing the work (1); torchrun --nproc-per-node K does the same and "
                        "spans machines")


def run_workers(run, args):
    """`run(args)` in args.workers local processes, each a rank of one gloo group; returns nothing (rank 0
    writes the files). A worker's exception is raised here."""
    with socket.socket() as s:   # a free port for the group's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.start_processes(_worker, args=(run, args, port), nprocs=args.workers, start_method="spawn")


def _worker(rank, run, args, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(args.workers), LOCAL_WORLD_SIZE=str(args.workers))
    try:
        run(args)
    finally:
        leave_group()


def leave_group():
    if dist.is_initialized():
        dist.destroy_process_group()


def wants_workers(args):
    """True in the process that should start --workers processes (not in one of them, nor under torchrun)."""
    cores = os.cpu_count() or 1
    if not 1 <= args.workers <= cores:   # each is a whole torch process
        raise ValueError(f"--workers must be from 1 to this machine's {cores} CPU cores, got {args.workers}")
    return args.workers > 1 and "WORLD_SIZE" not in os.environ


@dataclass(frozen=True)
class Shard:
    """This process's share of a run: rank 0 of 1, or one of several processes."""
    rank: int = 0
    world: int = 1
    local_world: int = 1

    @classmethod
    def start(cls, args):
        """Join the process group, if there is one, and set this process's threads: --threads, else the
        processes on a machine share its cores."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group("gloo")
        shard = cls(dist.get_rank(), world, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // shard.local_world))
        return shard

    def device(self, device):
        """A bare cuda device becomes this process's GPU (LOCAL_RANK), as torchrun intends."""
        if device.type == "cuda" and device.index is None and self.world > 1:
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return device

    @property
    def tag(self):
        return f"[rank {self.rank}] " if self.world > 1 else ""

    def mine(self, items):
        return list(items)[self.rank::self.world]

    def gather(self, obj):
        """Every process's `obj` (in rank order) on rank 0; None on the others."""
        if self.world == 1:
            return [obj]
        every = [None] * self.world if self.rank == 0 else None
        dist.gather_object(obj, every, dst=0)
        return every

    def share(self, obj):
        """Rank 0's `obj` on every process."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_first(self, fn):
        """fn() on rank 0 only (file writes); its ValueError is raised on every process."""
        error = None
        if self.rank == 0:
            try:
                fn()
            except ValueError as e:
                error = str(e)
        if (error := self.share(error)) is not None:
            raise ValueError(error)

    def batches(self, n, size, work):
        """[work(start, stop) for each batch of n items, in order] on rank 0 (None on the others), each
        batch computed by the process it falls to."""
        mine = {start: work(start, min(start + size, n)) for start in self.mine(range(0, n, size))}
        every = self.gather(mine)
        if every is None:
            return None
        merged = {start: part for parts in every for start, part in parts.items()}
        return [merged[start] for start in range(0, n, size)]
