"""The processes a launcher started, as it describes them in the environment: RANK, WORLD_SIZE
and LOCAL_RANK, read and checked in this one place. torchrun and the deepspeed launcher set all
three; a single process has none (rank 0 of a world of 1); LOCAL_RANK unset is the rank (one
node). Torch-free: `omp_wait` reads the world size before torch loads.

    rank, world, local_rank = ranks()      # checked: 1 <= world, 0 <= rank < world, 0 <= local
    world = world_size()
    if is_main(): ...                      # rank 0: the process that writes the shared files

A value that is not an integer, or ranks that do not fit the world, raise `LaunchEnvError` (a
ValueError: the command line checks the variables before a command that trains or benchmarks
starts, and prints `error: ...`, exit status 2), naming the variable, its value and the rule.
"""
from __future__ import annotations

import os

__all__ = ["LaunchEnvError", "is_main", "ranks", "world_size"]

NAMES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
_ONE = "unset RANK, WORLD_SIZE and LOCAL_RANK to run one process"


class LaunchEnvError(ValueError):
    """A launcher variable that is not an integer, or ranks that do not fit the world."""


def _integer(env, name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise LaunchEnvError(f"{name}={raw!r} in the environment is not an integer (0, 1, 2, "
                             f"...): a launcher (torchrun, deepspeed) sets it; {_ONE}") from None


def ranks(env=None) -> tuple[int, int, int]:
    """-> (rank, world size, local rank) from `env` (os.environ by default), checked."""
    env = os.environ if env is None else env
    world = _integer(env, "WORLD_SIZE", 1)
    rank = _integer(env, "RANK", 0)
    local_rank = _integer(env, "LOCAL_RANK", rank)

    def said(name, value):          # as the environment has it, or what its absence means
        return f"{name}={value}" if name in env else f"{name} unset ({value})"
    if world < 1:
        why = f"{said('WORLD_SIZE', world)}: a launcher starts at least 1 process"
    elif not 0 <= rank < world:
        why = (f"{said('RANK', rank)} with {said('WORLD_SIZE', world)}: a rank is 0 to "
               "WORLD_SIZE - 1")
    elif local_rank < 0:
        why = f"{said('LOCAL_RANK', local_rank)}: a local rank is 0 or more"
    else:
        return rank, world, local_rank
    raise LaunchEnvError(f"the launcher's environment does not fit: {why}; {_ONE}")


def world_size(env=None) -> int:
    """The number of processes the launcher started (1 without a launcher), checked."""
    return ranks(env)[1]


def is_main(env=None) -> bool:
    """Rank 0 (the only process without a launcher), checked."""
    return ranks(env)[0] == 0
