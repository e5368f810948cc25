"""The common kNN readout (evaluate.knn_votes / knn_predict / KNNReadout / knn_readout) against
kNN worked out by hand on 2-D features: majority, a tie in votes, a tie in votes and in
similarity, fewer labels than k; the pass over a loader; no random state touched. The run-level
checks (results.json keys, kill-and-resume, torchrun) extend tests in test_trainer.py,
test_distributed.py (launchers.same_run) and test_compare.py."""
import math

import numpy as np
import torch

from dietcl_fast.data.pipeline import Loader as LoaderBase
from dietcl_fast.evaluate import KNN_K, KNNReadout, knn_predict, knn_readout, knn_votes


def unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


# bank: unit vectors at these angles (degrees), with these classes; class 3 has no sample
ANGLES, CLASSES = [0, 20, 45, 70, 90, 135], [0, 0, 1, 2, 2, 1]
BANK = torch.tensor([unit(a) for a in ANGLES])
BANK_Y = torch.tensor(CLASSES)
# query angle -> (the 3 nearest bank angles, by hand) -> expected class
HAND = {
    10: ((0, 20, 45), 0),     # classes 0, 0, 1: majority 0
    40: ((45, 20, 70), 1),    # classes 1, 0, 2: one vote each -> the nearest sample's class (1,
                              # not the lowest id 0)
    80: ((70, 90, 45), 2),    # classes 2, 2, 1: majority 2
    120: ((135, 90, 70), 2),  # classes 1, 2, 2: 2 votes beat the nearer single class-1 sample
}


def test_knn_votes_and_prediction_match_hand_computed():
    assert KNN_K == 3
    q = torch.tensor([unit(a) for a in HAND])
    votes, nearest = knn_votes(-(q @ BANK.T), BANK_Y, 4, KNN_K)
    for i, (a, (near, want)) in enumerate(HAND.items()):
        hand_votes = [sum(CLASSES[ANGLES.index(b)] == c for b in near) for c in range(4)]
        assert votes[i].tolist() == hand_votes, a
        # nearest[c] = -(cosine to the closest class-c sample); none of class 3: +inf
        for c in range(3):
            closest = min(abs(a - b) for b, y in zip(ANGLES, CLASSES) if y == c)
            assert abs(float(nearest[i, c]) + math.cos(math.radians(closest))) < 1e-6, (a, c)
        assert nearest[i, 3] == float("inf")
    assert knn_predict(votes, nearest).tolist() == [want for _, want in HAND.values()]
    # through the classifier (unnormalised queries, an identity encoder): the same, one-hot
    out = KNNReadout(torch.nn.Identity(), BANK, BANK_Y, 4).classify(3.0 * q)
    assert out.tolist() == torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 2]), 4).tolist()


def test_ties_in_similarity_go_to_the_lowest_class_and_fewer_labels_than_k():
    # (1, 1) is exactly as similar to (1, 0) (class 2) as to (0, 1) (class 1); (-1, 0) (class 0)
    # is the third vote: one vote each, nearest tied between classes 1 and 2 -> 1 (not 0, the
    # lowest id overall, whose sample is the farthest)
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    clf = KNNReadout(torch.nn.Identity(), bank, torch.tensor([2, 1, 0]), 3)
    assert clf.classify(torch.tensor([[1.0, 1.0]])).argmax(1).tolist() == [1]
    # two labels seen, k = 3: both vote (1 - 1), the nearer one's class wins
    clf = KNNReadout(torch.nn.Identity(), bank[:2], torch.tensor([1, 0]), 2)
    assert clf.classify(torch.tensor([[2.0, 1.0], [1.0, 2.0]])).argmax(1).tolist() == [1, 0]


class FeatureLoader(LoaderBase):
    """The 'images' of ids are their rows of a feature table (the encoder is the identity)."""

    def __init__(self, table):
        self.table = table

    def submit(self, requests):
        assert all(r.kind == "eval" for r in requests)     # the evaluation transform
        return requests

    def fetch(self, ticket):
        return [self.table[torch.as_tensor(np.asarray(r.ids))] for r in ticket]


def test_knn_readout_scores_eval_sets_over_the_bank_without_touching_rng():
    # ids 0..5: the bank above; ids 6..9: the queries of HAND (labels: their hand answers,
    # except the last, labeled wrong on purpose)
    table = torch.cat([BANK, torch.tensor([unit(a) for a in HAND])])
    enc = torch.nn.Identity().train()
    cpu_rng, np_rng = torch.get_rng_state(), np.random.get_state()
    row, bank_n, eval_n = knn_readout(
        enc, FeatureLoader(table), np.arange(6), np.array(CLASSES),
        [(np.array([6, 7]), np.array([0, 1])), (np.array([8, 9]), np.array([2, 0])),
         (np.array([], dtype=np.int64), np.array([], dtype=np.int64))],
        num_classes=4, batch_size=4, autocast=torch.no_grad)
    assert row[:2] == [100.0, 50.0] and math.isnan(row[2])
    assert (bank_n, eval_n) == (6, 4)
    assert enc.training                                       # its mode restored
    assert torch.equal(torch.get_rng_state(), cpu_rng)
    st = np.random.get_state()
    assert st[0] == np_rng[0] and np.array_equal(st[1], np_rng[1]) and st[2:] == np_rng[2:]
    # batches smaller than the bank or an eval set: the same row
    row2, _, _ = knn_readout(
        enc, FeatureLoader(table), np.arange(6), np.array(CLASSES),
        [(np.array([6, 7]), np.array([0, 1])), (np.array([8, 9]), np.array([2, 0]))],
        num_classes=4, batch_size=1, autocast=torch.no_grad)
    assert row2 == row[:2]
    # no label seen: undefined (NaN), nothing forwarded
    row3, bank_n, eval_n = knn_readout(enc, FeatureLoader(table), np.arange(0), np.arange(0),
                                       [(np.array([6]), np.array([0]))], 4, 4, torch.no_grad)
    assert math.isnan(row3[0]) and (bank_n, eval_n) == (0, 0)


def test_train_table_shows_both_readouts():
    from dietcl_fast.results import table
    res = {"accuracy_matrix": [[50.0], [40.0, 30.0]], "A": [50.0, 35.0], "final_accuracy": 35.0,
           "average_accuracy": 42.5, "forgetting": 10.0, "budget": 2,
           "ledger": {"flops_total": 1e9},
           "readouts": {"knn": {"k": 3, "A": [None, 45.5], "final_accuracy": 45.5,
                                "average_accuracy": None, "seconds": 1.25}}}
    lines = table(res).splitlines()
    assert lines[-2].startswith("A(T) = 35.00%   Ā = 42.50%")
    assert lines[-1] == ("3-NN readout (encoder features, every label seen so far): "
                         "A(t) = [    .  45.5]   A(T) = 45.50%   Ā = n/a   (1.2 s, not charged)")
