"""Retrieval metrics: ours against ir-measures on random cases, and hand-computed small cases."""

from __future__ import annotations

import math
import random

import ir_measures
import pytest

from evaluation.metrics import ESCI_GAINS, esci_qrels, evaluate, mmp_at_k, r_at_1

RUN = {"q1": ["a", "b", "c", "d", "e"], "q2": ["x", "y"], "q3": ["m", "n"]}
QRELS = {"q1": {"a": 1.0, "c": 0.1, "z": 1.0}, "q2": {"y": 1.0}, "q3": {}}


def test_hand_computed_small_case():
    means, per_query = evaluate(RUN, QRELS, k=5, per_query=True)
    # q1: relevant {a, c, z}; a at 1 and c at 3 are found. q2: y at 2. q3: nothing is relevant.
    assert per_query["mMP@5"] == {"q1": 2 / 3, "q2": 1.0, "q3": 0.0}
    assert per_query["mR@1"] == {"q1": 1.0, "q2": 0.0, "q3": 0.0}
    assert per_query["MRR"] == {"q1": 1.0, "q2": 0.5, "q3": 0.0}
    assert per_query["MAP@5"]["q1"] == pytest.approx((1 / 1 + 2 / 3) / 3, abs=1e-12)
    assert per_query["recall@5"]["q1"] == pytest.approx(2 / 3, abs=1e-12)
    dcg = 1.0 / math.log2(2) + 0.1 / math.log2(4)
    ideal = 1.0 / math.log2(2) + 1.0 / math.log2(3) + 0.1 / math.log2(4)
    assert per_query["nDCG@5"]["q1"] == pytest.approx(dcg / ideal, abs=1e-9)
    assert means["mMP@5"] == pytest.approx((2 / 3 + 1.0) / 3, abs=1e-12)


def test_modified_precision_is_precision_or_recall_at_k_by_hand():
    assert mmp_at_k(["a", "b", "c"], {"a": 1, "b": 1, "c": 1, "d": 1}, k=3) == 1.0
    assert mmp_at_k(["a", "x", "y"], {"a": 1}, k=3) == 1.0  # one relevant, found: full marks
    assert mmp_at_k(["x", "y", "a"], {"a": 1, "b": 1}, k=2) == 0.0
    assert mmp_at_k(["x"], {}, k=5) == 0.0
    assert r_at_1(["a", "b"], {"b": 1}) == 0.0 and r_at_1(["b"], {"b": 1}) == 1.0 and r_at_1([], {"b": 1}) == 0.0


def random_case(rng: random.Random):
    docs = [f"d{i}" for i in range(30)]
    run, qrels = {}, {}
    for q in range(20):
        run[f"q{q}"] = rng.sample(docs, rng.randint(1, 25))
        qrels[f"q{q}"] = {d: rng.choice([0.0, 0.01, 0.1, 1.0]) for d in rng.sample(docs, rng.randint(1, 12))}
    return run, qrels


@pytest.mark.parametrize("seed", range(25))
@pytest.mark.parametrize("k", [1, 5, 10])
def test_ours_agree_with_ir_measures_on_random_cases(seed, k):
    run, qrels = random_case(random.Random(seed * 31 + k))
    _, ours = evaluate(run, qrels, k=k, per_query=True)
    lib_qrels = [ir_measures.Qrel(q, d, int(round(g * 1000))) for q, docs in qrels.items() for d, g in docs.items()]
    lib_run = [ir_measures.ScoredDoc(q, d, float(100 - i)) for q, docs in run.items() for i, d in enumerate(docs)]
    measures = [ir_measures.P @ k, ir_measures.R @ k, ir_measures.P @ 1, ir_measures.AP @ k, ir_measures.RR,
                ir_measures.nDCG @ k]
    reference = {(m.query_id, str(m.measure)): m.value for m in ir_measures.iter_calc(measures, lib_qrels, lib_run)}
    for q in run:
        relevant = sum(1 for g in qrels[q].values() if g > 0)
        if not relevant:
            continue
        # mMP@k is P@k when k relevant items exist, R@k when fewer do; mR@1 is P@1.
        expected = reference[(q, f"P@{k}")] if relevant >= k else reference[(q, f"R@{k}")]
        assert ours[f"mMP@{k}"][q] == pytest.approx(expected, abs=1e-9)
        assert ours["mR@1"][q] == pytest.approx(reference[(q, "P@1")], abs=1e-9)
        assert ours[f"MAP@{k}"][q] == pytest.approx(reference[(q, f"AP@{k}")], abs=1e-9)
        assert ours["MRR"][q] == pytest.approx(reference[(q, "RR")], abs=1e-9)
        assert ours[f"nDCG@{k}"][q] == pytest.approx(reference[(q, f"nDCG@{k}")], abs=1e-9)


def test_esci_labels_map_to_gains_and_the_mapping_is_a_parameter():
    qrels = esci_qrels({"q": {"a": "E", "b": "S", "c": "C", "d": "I"}})
    assert qrels == {"q": {"a": 1.0, "b": 0.1, "c": 0.01, "d": 0.0}}
    strict = esci_qrels({"q": {"a": "E", "b": "S"}}, gains={**ESCI_GAINS, "S": 0.0})
    assert evaluate({"q": ["b", "a"]}, strict)["mR@1"] == 0.0
    with pytest.raises(ValueError, match="unknown relevance labels"):
        esci_qrels({"q": {"a": "X"}})
