"""Task-balanced replay buffer (docs/algorithm.md, Buffer) — thin Python face of the C++ ``dietcl::BalancedBuffer``.

Keeps *every* labeled sample as (id, label) per task (16 bytes/sample; the task is stored once
per task), never truncates, and samples with a draw that is a pure function of
``(seed, mode, step, n, contents)``: any step, in any order, from any thread gives the same
result.  Semantics (see ``csrc/include/dietcl/balanced_buffer.hpp`` for the full contract):

* each of the T non-empty tasks gets ``n // T`` items; the ``n % T`` remainder items go to a
  window of tasks that rotates round-robin with ``step`` (every task gets the same count +-1
  over consecutive steps);
* default: without replacement within a task's epoch (a keyed Feistel permutation per
  (task, epoch, task size), walked contiguously by consecutive steps with the same n and T);
  ``replacement=True``: i.i.d. uniform within the task; ``class_balanced=True``: within the
  task's share, classes are visited round-robin and samples are drawn per class;
* ``world_size`` shards are strided over the global draw (rank r gets global items r, r+W, ...):
  disjoint, union = the global draw, each itself task-balanced.
"""
from __future__ import annotations

import numpy as np

from dietcl_fast import _core

__all__ = ["BalancedBuffer"]


def _as_int64(x, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim == 0:
        raise ValueError(f"BalancedBuffer.add: {name} must be a 1-D sequence, got a scalar")
    if arr.ndim != 1:
        raise ValueError(f"BalancedBuffer.add: {name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return np.empty(0, dtype=np.int64)
    if arr.dtype == np.int64:
        return np.ascontiguousarray(arr)
    if arr.dtype.kind in "iub":
        out = arr.astype(np.int64)
        if arr.dtype.kind == "u" and arr.dtype.itemsize >= 8 and (arr > np.iinfo(np.int64).max).any():
            raise ValueError(f"BalancedBuffer.add: {name} has values above the int64 range")
        return out
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"BalancedBuffer.add: {name} contains non-finite values")
        out = arr.astype(np.int64)
        if not np.array_equal(out.astype(arr.dtype), arr):
            raise ValueError(f"BalancedBuffer.add: {name} has non-integer values (lossy conversion to int64)")
        return out
    if arr.dtype == object:
        try:
            out = np.array([int(v) for v in arr.tolist()], dtype=np.int64)
        except (TypeError, ValueError, OverflowError) as e:
            raise ValueError(f"BalancedBuffer.add: {name} must hold integers ({e})") from None
        if any(int(a) != b for a, b in zip(arr.tolist(), out.tolist())):
            raise ValueError(f"BalancedBuffer.add: {name} has non-integer values (lossy conversion to int64)")
        return out
    raise ValueError(f"BalancedBuffer.add: {name} must hold integers, got dtype {arr.dtype}")


def _as_index(x, name: str) -> int:
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
        raise ValueError(f"BalancedBuffer: {name} must be an integer, got {type(x).__name__}")
    return int(x)


class BalancedBuffer:
    """Task-balanced replay index over all labeled samples seen so far."""

    def __init__(self, seed: int = 0, replacement: bool = False, class_balanced: bool = False,
                 *, _core_buffer=None):
        if _core_buffer is not None:
            self._b = _core_buffer
            return
        seed = _as_index(seed, "seed")
        if seed < 0 or seed >= 2**64:
            raise ValueError(f"BalancedBuffer: seed must be in [0, 2^64), got {seed}")
        self._b = _core.BalancedBuffer(seed, bool(replacement), bool(class_balanced))

    # ------------------------------------------------------------------ content
    def add(self, task: int, ids, labels) -> None:
        """Append samples (ids >= 0, any int labels) to ``task`` (>= 0); tasks in any order."""
        task = _as_index(task, "task")
        if task < 0:
            raise ValueError(f"BalancedBuffer.add: task must be >= 0, got {task}")
        ids_a = _as_int64(ids, "ids")
        labels_a = _as_int64(labels, "labels")
        if ids_a.shape[0] != labels_a.shape[0]:
            raise ValueError(
                f"BalancedBuffer.add: ids and labels must have the same length "
                f"(got {ids_a.shape[0]} ids and {labels_a.shape[0]} labels)")
        self._b.add(task, ids_a, labels_a)

    def sample(self, n: int, step: int, rank: int = 0, world_size: int = 1):
        """This rank's shard of the global draw of ``n`` items at ``step``.

        Returns ``(ids int64, labels int64, tasks int32)`` numpy arrays (no copy)."""
        if not (type(n) is int and type(step) is int and type(rank) is int and type(world_size) is int):
            n = _as_index(n, "n")
            step = _as_index(step, "step")
            rank = _as_index(rank, "rank")
            world_size = _as_index(world_size, "world_size")
        return self._b.sample(n, step, rank, world_size)

    def __len__(self) -> int:
        return len(self._b)

    @property
    def num_tasks(self) -> int:
        """Number of non-empty tasks seen."""
        return self._b.num_tasks

    @property
    def seed(self) -> int:
        return self._b.seed

    @property
    def replacement(self) -> bool:
        return self._b.replacement

    @property
    def class_balanced(self) -> bool:
        return self._b.class_balanced

    def task_sizes(self) -> dict[int, int]:
        return dict(self._b.task_sizes())

    # ------------------------------------------------------------------ state
    def state_bytes(self) -> bytes:
        return self._b.state_bytes()

    @classmethod
    def from_state_bytes(cls, b: bytes) -> "BalancedBuffer":
        if not isinstance(b, (bytes, bytearray, memoryview)):
            raise ValueError(f"BalancedBuffer state: expected bytes, got {type(b).__name__}")
        return cls(_core_buffer=_core.BalancedBuffer.from_state_bytes(bytes(b)))

    def state_dict(self) -> dict:
        return {"bytes": self.state_bytes()}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or "bytes" not in state:
            raise ValueError("BalancedBuffer.load_state_dict: expected a dict with key 'bytes'")
        self._b = type(self).from_state_bytes(state["bytes"])._b

    def __repr__(self) -> str:
        return (f"BalancedBuffer(samples={len(self)}, tasks={self.num_tasks}, seed={self.seed}, "
                f"replacement={self.replacement}, class_balanced={self.class_balanced})")
