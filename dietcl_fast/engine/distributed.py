"""Processes: who am I, how many are we, and the few collectives the trainer needs.

`init_from_env` reads what a launcher put in the environment:

* ``torchrun`` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT (and TORCHELASTIC_RUN_ID);
* the ``deepspeed`` launcher sets the same plus CROSS_RANK / CROSS_SIZE / LOCAL_SIZE, and
  appends ``--local_rank=N`` to the command line (the CLI accepts and ignores it);
* a plain ``dietcl-fast train`` sets none: one process, no process group (the deepspeed engine
  then opens a world of one on 127.0.0.1 itself, because DeepSpeed needs a process group).

The process group is gloo on the CPU and nccl on GPUs. Every rank runs the same deterministic
code on the same seeded state, so collectives are needed only for gradients (engines),
evaluation counts and checkpoint barriers.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..launch_env import ranks

__all__ = ["DistInfo", "init_from_env", "launched_by", "resolve_engine", "free_port"]


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None        # None: single process without a process group
    launcher: str = "none"            # none | torchrun | deepspeed | env

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.active and self.world_size > 1:
            dist.barrier()

    def all_reduce_sum(self, values: list[int | float], device=None) -> list:
        """Sum of a short list of numbers over ranks (exact for integers below 2^53)."""
        if not (self.active and self.world_size > 1):
            return list(values)
        # nccl reduces device tensors only; gloo host tensors
        dev = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" \
            else torch.device("cpu")
        t = torch.tensor(values, dtype=torch.float64, device=dev)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return [float(v) for v in t.cpu().tolist()]

    def check_agree(self, config: dict, fingerprint: str) -> None:
        """Every rank was started with the same options (`config`, `Config.to_dict()` form)
        and built the same stream (`fingerprint`); else a ConfigError on every rank naming the
        first rank that differs from rank 0 and the first difference, before any compute
        (options that differ would otherwise give a silently different run, or collectives
        that do not match: an abort under gloo, a hang under NCCL)."""
        if not (self.active and self.world_size > 1):
            return
        from ..config import ConfigError, differences
        mine = (config, fingerprint)
        every = [None] * self.world_size
        dist.all_gather_object(every, mine)
        (cfg0, fp0) = every[0]
        for r, (cfg_r, fp_r) in enumerate(every):
            diff = differences(cfg0, cfg_r, skip=("run.progress",),   # (drawn by rank 0 only)
                               labels=("on rank 0", f"on rank {r}"))
            if diff:
                more = f" (and {len(diff) - 1} more difference(s))" if len(diff) > 1 else ""
                raise ConfigError(
                    f"the {self.world_size} processes were not started with the same options: "
                    f"{diff[0]}{more}; start every process with the same command (stopped "
                    "before any compute)")
            if fp_r != fp0:
                raise ConfigError(
                    f"the {self.world_size} processes read different data: rank {r}'s stream "
                    f"(fingerprint {fp_r}) is not rank 0's ({fp0}); --data must name the same "
                    "files with the same labels on every machine (stopped before any compute)")

    def describe(self) -> str:
        if self.world_size == 1 and self.backend is None:
            return "1 process"
        return (f"rank {self.rank}/{self.world_size} (local {self.local_rank}), {self.backend}, "
                f"launched by {self.launcher}")


def launched_by(env=None) -> str:
    """torchrun | deepspeed | env (RANK/WORLD_SIZE set by hand or by another launcher) | none."""
    env = os.environ if env is None else env
    if "CROSS_RANK" in env or "CROSS_SIZE" in env:          # deepspeed.launcher.launch
        return "deepspeed"
    if "TORCHELASTIC_RUN_ID" in env or "GROUP_RANK" in env:  # torchrun / torch.distributed.run
        return "torchrun"
    if "RANK" in env and "WORLD_SIZE" in env:
        return "env"
    return "none"


def resolve_engine(name: str, env=None) -> str:
    """`auto` -> deepspeed when started by the deepspeed launcher, else torch (which uses
    gradient all-reduce across ranks when started by torchrun)."""
    if name != "auto":
        return name
    return "deepspeed" if launched_by(env) == "deepspeed" else "torch"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_from_env(device_type: str, *, force_group: bool = False) -> DistInfo:
    """Join the process group the launcher described; `force_group` opens a world of one
    (DeepSpeed needs a process group even for one process)."""
    env = os.environ
    launcher = launched_by(env)
    rank, world, local_rank = ranks(env)
    backend = "nccl" if device_type == "cuda" else "gloo"
    if world == 1 and not force_group:
        if dist.is_available() and dist.is_initialized():
            return DistInfo(0, 1, local_rank, dist.get_backend(), launcher)
        return DistInfo(0, 1, local_rank, None, launcher)
    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            said = (f"LOCAL_RANK={local_rank}" if "LOCAL_RANK" in env else
                    f"LOCAL_RANK unset (so the rank, {local_rank}: set it to this process's GPU "
                    "on its node; torchrun and the deepspeed launcher do)")
            raise ValueError(f"{said} but only {torch.cuda.device_count()} GPUs are visible on "
                             "this node; start at most one process per GPU")
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        if world == 1:   # a world of one on the loopback interface, on a free port
            env.setdefault("MASTER_ADDR", "127.0.0.1")
            env.setdefault("MASTER_PORT", str(free_port()))
            env.setdefault("RANK", "0")
            env.setdefault("WORLD_SIZE", "1")
            env.setdefault("LOCAL_RANK", "0")
        for k in ("MASTER_ADDR", "MASTER_PORT"):
            if k not in env:
                raise ValueError(f"WORLD_SIZE={world} but {k} is not set: start with torchrun or "
                                 "the deepspeed launcher, or export MASTER_ADDR and MASTER_PORT")
        kw = {}
        if backend == "nccl":
            kw["device_id"] = torch.device("cuda", local_rank)
        dist.init_process_group(backend=backend, rank=rank, world_size=world, **kw)
    return DistInfo(rank, world, local_rank, dist.get_backend(), launcher)
