"""The processes a launcher started, as it describes them in the environment: RANK, WORLD_SIZE
and LOCAL_RANK, read and checked in this one place. torchrun and the deepspeed launcher set all
three; a single process has none (rank 0 of a world of 1). Torch-free: `omp_wait` reads the
world size before torch loads.

    rank, world, local_rank = ranks()      # checked: 1 <= world, 0 <= rank < world, 0 <= local
    world = world_size()
    if is_main(): ...                      # rank 0: the process that writes the shared files

A value that is not a whole number, or ranks that do not fit the world, raise `LaunchEnvError`
(a ValueError: the command line prints it as `error: ...`, exit status 2) naming the variable
and its value.
"""
from __future__ import annotations

import os

__all__ = ["LaunchEnvError", "is_main", "ranks", "world_size"]


class LaunchEnvError(ValueError):
    """A launcher variable that is not a whole number, or ranks that do not fit the world."""


def _whole(env, name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise LaunchEnvError(f"{name}={raw!r} in the environment is not a whole number: a "
                             "launcher (torchrun, deepspeed) sets it; unset it to run one "
                             "process") from None


def ranks(env=None) -> tuple[int, int, int]:
    """-> (rank, world size, local rank) from `env` (os.environ by default), checked."""
    env = os.environ if env is None else env
    world = _whole(env, "WORLD_SIZE", 1)
    rank = _whole(env, "RANK", 0)
    local_rank = _whole(env, "LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world or local_rank < 0:
        raise LaunchEnvError(f"launcher environment is inconsistent: RANK={rank}, "
                             f"WORLD_SIZE={world}, LOCAL_RANK={local_rank}")
    return rank, world, local_rank


def world_size(env=None) -> int:
    """The number of processes the launcher started (1 without a launcher), checked."""
    return ranks(env)[1]


def is_main(env=None) -> bool:
    """Rank 0 (the only process without a launcher), checked."""
    return ranks(env)[0] == 0
