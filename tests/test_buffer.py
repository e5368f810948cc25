"""BalancedBuffer (native core) — balance, uniformity, determinism, shards, modes, state, errors."""
import threading

import numpy as np
import pytest
import torch

from dietcl_fast.buffer import BalancedBuffer


def chisquare_p(counts) -> float:
    """Pearson's chi-square test of `counts` against the uniform distribution -> its p-value:
    the chi-square distribution's survival function, Q(df / 2, stat / 2) (scipy.stats.chisquare's
    value; scipy.stats alone took a second of each test worker's start)."""
    counts = np.asarray(counts, dtype=np.float64)
    expected = counts.mean()
    stat = float(((counts - expected) ** 2 / expected).sum())
    df = len(counts) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def test_chisquare_p_is_scipys():
    """The helper against values scipy.stats.chisquare gives (scipy 1.x, recorded)."""
    assert chisquare_p([10, 10, 10, 10]) == pytest.approx(1.0)
    assert chisquare_p([16, 18, 16, 14, 12, 12]) == pytest.approx(0.849145, abs=1e-6)
    assert chisquare_p([30, 10, 10, 10]) == pytest.approx(1.6974e-4, rel=1e-4)


def make(sizes, seed=0, classes=None, **kw):
    b = BalancedBuffer(seed=seed, **kw)
    start = 0
    for t, sz in enumerate(sizes):
        ids = np.arange(start, start + sz, dtype=np.int64)
        labels = ids % classes if classes else np.full(sz, t, dtype=np.int64)
        b.add(t, ids, labels)
        start += sz
    return b


def test_basic_api_and_dtypes():
    b = BalancedBuffer(seed=3)
    b.add(2, [10, 11, 12], [0, 1, 0])
    b.add(0, np.array([1, 2], dtype=np.int32), np.array([5, 5], dtype=np.uint8))
    b.add(2, np.array([13.0]), [1])  # lossless float -> int ok
    assert len(b) == 6 and b.num_tasks == 2
    assert b.task_sizes() == {0: 2, 2: 4}
    ids, labels, tasks = b.sample(7, step=0)
    assert ids.dtype == np.int64 and labels.dtype == np.int64 and tasks.dtype == np.int32
    assert len(ids) == 7
    assert ids.flags.owndata is False  # handed over without copying (owned by a capsule)
    assert set(np.unique(tasks)) == {0, 2}
    assert np.bincount(tasks, minlength=3)[[0, 2]].tolist() in ([4, 3], [3, 4])


def test_balance_across_tasks_chi_square():
    b = make([10, 500, 3000, 77])
    counts = np.zeros(4)
    for s in range(200):
        _, _, tasks = b.sample(101, s)  # 101 % 4 != 0: remainder rotates
        counts += np.bincount(tasks, minlength=4)
    # every task gets n/T +-1 per step, and exactly equal over T consecutive steps
    assert counts.sum() == 200 * 101
    assert counts.max() - counts.min() <= 1
    p = chisquare_p(counts)
    assert p > 0.99


def test_uniform_within_task_with_replacement():
    b = make([50, 200], seed=1, replacement=True)
    ids_all = np.concatenate([b.sample(100, s)[0] for s in range(400)])
    for lo, sz in ((0, 50), (50, 200)):
        sel = ids_all[(ids_all >= lo) & (ids_all < lo + sz)] - lo
        counts = np.bincount(sel, minlength=sz)
        assert chisquare_p(counts) > 1e-3


def test_without_replacement_epochs_and_uniformity():
    sizes = [37, 128, 1000]
    b = make(sizes, seed=5)
    n = 30  # 10 per task per step
    per_task = {t: [] for t in range(3)}
    for s in range(300):
        ids, _, tasks = b.sample(n, s)
        for t in range(3):
            per_task[t].append(ids[tasks == t])
    start = 0
    for t, sz in enumerate(sizes):
        stream = np.concatenate(per_task[t]) - start
        # each full epoch is a permutation: no repeats within an epoch
        for e in range(len(stream) // sz):
            ep = stream[e * sz:(e + 1) * sz]
            assert len(np.unique(ep)) == sz
        # permutations differ between epochs
        if len(stream) >= 2 * sz:
            assert not np.array_equal(stream[:sz], stream[sz:2 * sz])
        # position of the first draw across epochs is roughly uniform (permutation quality)
        start += sz


def test_first_draw_position_uniform_over_seeds():
    firsts = np.array([make([20], seed=s).sample(1, 0)[0][0] for s in range(2000)])
    assert chisquare_p(np.bincount(firsts, minlength=20)) > 1e-3
    pairs = np.array([make([20], seed=s).sample(2, 0)[0] for s in range(2000)])
    # consecutive draws are not correlated (difference mod n roughly uniform over 1..19)
    diffs = (pairs[:, 1] - pairs[:, 0]) % 20
    assert (diffs == 0).sum() == 0
    assert chisquare_p(np.bincount(diffs, minlength=20)[1:]) > 1e-3


def test_no_truncation_every_sample_reachable():
    for kw in ({}, {"replacement": True}):
        b = make([3, 50, 1000], seed=2, **kw)
        seen = set()
        for s in range(200):
            seen.update(b.sample(300, s)[0].tolist())  # 20k draws per task
        assert seen == set(range(1053))


def test_determinism_and_call_order():
    b = make([100, 200, 300], seed=7)
    seq = [b.sample(64, s) for s in range(20)]
    rev = {s: b.sample(64, s) for s in reversed(range(20))}
    other = make([100, 200, 300], seed=7)
    for s in range(20):
        for a, c, d in zip(seq[s], rev[s], other.sample(64, s)):
            assert np.array_equal(a, c) and np.array_equal(a, d)
    diff = make([100, 200, 300], seed=8).sample(64, 0)[0]
    assert not np.array_equal(diff, seq[0][0])
    assert not np.array_equal(seq[0][0], seq[1][0])


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_rank_shards_disjoint_union(world_size):
    b = make([40, 70, 500], seed=4)
    for n in (0, 5, 97, 300):
        g = b.sample(n, 11)
        parts = [b.sample(n, 11, rank=r, world_size=world_size) for r in range(world_size)]
        assert sum(len(p[0]) for p in parts) == n
        for r, p in enumerate(parts):
            for k in range(3):
                assert np.array_equal(p[k], g[k][r::world_size])  # strided shard of the global draw
        if n <= 70:  # within one epoch of the smaller task, positions are distinct
            pos = set()
            for r, p in enumerate(parts):
                pos.update(range(r, n, world_size))
            assert pos == set(range(n))


def test_class_balanced_mode():
    b = BalancedBuffer(seed=0, class_balanced=True)
    # task 0: class 0 has 990 samples, class 1 has 10
    b.add(0, np.arange(1000), np.r_[np.zeros(990, int), np.ones(10, int)])
    b.add(1, np.arange(1000, 1100), np.arange(100) % 4)
    labels_0, labels_1 = [], []
    for s in range(50):
        ids, labels, tasks = b.sample(40, s)
        labels_0.append(labels[tasks == 0])
        labels_1.append(labels[tasks == 1])
        assert np.all(ids[tasks == 0][labels[tasks == 0] == 1] >= 990)
    c0 = np.bincount(np.concatenate(labels_0))
    c1 = np.bincount(np.concatenate(labels_1))
    assert c0[0] == c0[1] == 500
    assert np.all(c1 == 250)
    # the rare class is cycled without replacement: all 10 samples appear, each 50 times
    ids0 = np.concatenate([b.sample(40, s)[0] for s in range(50)])
    assert np.all(np.bincount(ids0[(ids0 >= 990) & (ids0 < 1000)] - 990) == 50)
    br = BalancedBuffer(seed=0, class_balanced=True, replacement=True)
    br.add(0, np.arange(1000), np.r_[np.zeros(990, int), np.ones(10, int)])
    lab = np.concatenate([br.sample(20, s)[1] for s in range(50)])
    assert np.bincount(lab).tolist() == [500, 500]


def test_append_and_any_task_order():
    b = BalancedBuffer(seed=1)
    b.add(5, [1, 2], [0, 0])
    b.add(1, [3], [1])
    b.add(5, [4], [0])
    assert b.task_sizes() == {1: 1, 5: 3} and b.num_tasks == 2
    ids, _, tasks = b.sample(6, 0)
    assert sorted(np.unique(tasks).tolist()) == [1, 5]
    assert set(ids[tasks == 5]) == {1, 2, 4}


@pytest.mark.parametrize("kw", [{}, {"replacement": True}, {"class_balanced": True}])
def test_state_round_trip(kw):
    b = make([13, 200, 57], seed=9, classes=5, **kw)
    blob = b.state_bytes()
    assert isinstance(blob, bytes)
    assert len(blob) == 48 + 12 * 3 + 16 * (13 + 200 + 57)
    r = BalancedBuffer.from_state_bytes(blob)
    assert r.task_sizes() == b.task_sizes() and r.seed == 9
    for s in (0, 3, 1000):
        for a, c in zip(b.sample(77, s, 1, 3), r.sample(77, s, 1, 3)):
            assert np.array_equal(a, c)
    sd = b.state_dict()
    fresh = BalancedBuffer()
    fresh.load_state_dict(sd)
    assert np.array_equal(fresh.sample(10, 2)[0], b.sample(10, 2)[0])


def test_corrupted_state_raises():
    blob = bytearray(make([10, 20]).state_bytes())
    flipped = bytearray(blob)
    flipped[40] ^= 0x01
    with pytest.raises(ValueError, match="checksum mismatch"):
        BalancedBuffer.from_state_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="truncated"):
        BalancedBuffer.from_state_bytes(bytes(blob[:-5]))
    with pytest.raises(ValueError, match="truncated"):
        BalancedBuffer.from_state_bytes(bytes(blob[:10]))
    bad = bytearray(blob)
    bad[0:8] = b"NOTMAGIC"
    with pytest.raises(ValueError, match="bad magic"):
        BalancedBuffer.from_state_bytes(bytes(bad))
    ver = bytearray(blob)
    ver[8] = 99
    with pytest.raises(ValueError, match="unsupported version 99"):
        BalancedBuffer.from_state_bytes(bytes(ver))
    with pytest.raises(ValueError, match="expected bytes"):
        BalancedBuffer.from_state_bytes("not bytes")


def test_concurrent_sampling_matches_sequential():
    b = make([5000] * 8, seed=11)
    steps = list(range(64))
    expected = {s: b.sample(3000, s) for s in steps}
    results = {}
    errors = []

    def worker(chunk):
        try:
            for s in chunk:
                results[s] = b.sample(3000, s)
        except Exception as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(steps[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for s in steps:
        for a, c in zip(expected[s], results[s]):
            assert np.array_equal(a, c)


def test_large_draw_uses_threads_and_is_consistent():
    b = make([50_000] * 4, seed=0)
    ids, _, tasks = b.sample(400_000, 3)  # above the parallel threshold
    assert np.array_equal(np.bincount(tasks), [100_000] * 4)
    for t in range(4):
        assert len(np.unique(ids[tasks == t])) == 50_000  # two full epochs
    small = b.sample(400_000, 3, rank=1, world_size=4)
    assert np.array_equal(small[0], ids[1::4])


@pytest.mark.parametrize("call, match", [
    (lambda b: b.add(0, [1, 2], [1]), "same length"),
    (lambda b: b.add(-1, [1], [1]), "task must be >= 0"),
    (lambda b: b.add(0, [-5], [1]), r"ids must be >= 0 \(ids\[0\] = -5\)"),
    (lambda b: b.add(0, [1.5], [1]), "non-integer"),
    (lambda b: b.add(0, ["a"], [1]), "must hold integers"),
    (lambda b: b.add(0, [[1]], [[1]]), "must be 1-D"),
    (lambda b: b.add(2**31, [1], [1]), r"task must be in \[0, 2\^31\)"),
    (lambda b: b.sample(-1, 0), "n must be >= 0"),
    (lambda b: b.sample(4, -2), "step must be >= 0"),
    (lambda b: b.sample(4, 0, rank=0, world_size=0), "world_size must be >= 1"),
    (lambda b: b.sample(4, 0, rank=2, world_size=2), r"rank must be in \[0, world_size\)"),
    (lambda b: b.sample(4, 0, rank=-1, world_size=2), r"rank must be in \[0, world_size\)"),
    (lambda b: b.sample(4.0, 0), "n must be an integer"),
])
def test_bad_input_raises_value_error(call, match):
    b = make([3])
    with pytest.raises(ValueError, match=match):
        call(b)


def test_empty_buffer_sampling_raises():
    b = BalancedBuffer()
    assert len(b.sample(0, 0)[0]) == 0
    with pytest.raises(ValueError, match="empty buffer"):
        b.sample(1, 0)
    b.add(0, [], [])  # empty add is a no-op
    assert b.num_tasks == 0
