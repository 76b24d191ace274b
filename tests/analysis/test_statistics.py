"""Routing-analysis statistics against routing maps counted by hand (no model, no matplotlib)."""

import numpy as np
import pytest

from megatron.remoe.analysis import (
    AnalysisError,
    RoutingCapture,
    active_experts_by_domain,
    domain_expert_share,
    experts_by_frequency,
    flip_rates,
    frequency_ranks,
    layer_summary,
    log_rank_buckets,
    top_tokens_per_expert,
)

pytestmark = pytest.mark.timeout(30)

# 2 MoE layers (global numbers 2 and 4) x 6 tokens x 4 experts.
# Layer 2: token 3 has no expert, expert 3 is dead. Layer 4: every token -> expert 2 only.
L2 = [[1, 1, 0, 0],
      [1, 0, 0, 0],
      [1, 1, 1, 0],
      [0, 0, 0, 0],
      [0, 1, 0, 0],
      [1, 0, 0, 0]]
L4 = [[0, 0, 1, 0]] * 6
ROUTING = np.array([L2, L4], dtype=bool)
LAYERS = [2, 4]
DOMAINS = np.array([0, 0, 0, 1, 1, 1])
TOKENS = np.array([5, 7, 5, 9, 5, 2])
# training counts of ids 0..9: rank 1 = id 5, 2 = id 2, 3 = id 7, 4 = id 9, then unseen ids
COUNTS = np.array([0, 0, 50, 0, 0, 100, 0, 10, 0, 1])


def test_layer_summary_hand_count():
    s = layer_summary(ROUTING, LAYERS)
    a, b = s
    assert a["layer"] == 2 and a["tokens"] == 6
    # loads [4, 3, 1, 0]; experts per token [2, 1, 3, 0, 1, 1]
    assert a["sparsity"] == pytest.approx(1 - 8 / 24)
    assert a["experts_per_token"] == pytest.approx(8 / 6)
    assert a["zero_expert_fraction"] == pytest.approx(1 / 6)
    assert a["dead_experts"] == 1 and a["dead_expert_ids"] == "3"
    assert a["max_over_mean_load"] == pytest.approx(4 / 2)
    assert a["experts_per_token_hist"] == "1 3 1 1 0"
    assert b["layer"] == 4
    assert b["sparsity"] == pytest.approx(0.75) and b["experts_per_token"] == pytest.approx(1)
    assert b["zero_expert_fraction"] == 0
    assert b["dead_experts"] == 3 and b["dead_expert_ids"] == "0 1 3"
    assert b["max_over_mean_load"] == pytest.approx(6 / 1.5)


def test_domain_share_and_active_experts_hand_count():
    counts, share = domain_expert_share(ROUTING, DOMAINS, 2)
    # layer 2: domain 0 = tokens 0-2 -> e0 3, e1 2, e2 1; domain 1 = tokens 3-5 -> e0 1, e1 1
    assert counts[0].tolist() == [[3, 2, 1, 0], [1, 1, 0, 0]]
    np.testing.assert_allclose(share[0], [[1 / 2, 1 / 3, 1 / 6, 0], [1 / 2, 1 / 2, 0, 0]])
    np.testing.assert_allclose(share[1], [[0, 0, 1, 0], [0, 0, 1, 0]])
    mean, tokens = active_experts_by_domain(ROUTING, DOMAINS, 3)  # domain 2: no token
    assert tokens.tolist() == [3, 3, 0]
    np.testing.assert_allclose(mean[:, :2], [[2, 2 / 3], [1, 1]])
    assert np.isnan(mean[:, 2]).all()


def test_frequency_buckets_hand_count():
    assert frequency_ranks(COUNTS)[[5, 2, 7, 9, 0, 1, 8]].tolist() == [1, 2, 3, 4, 5, 6, 10]
    # geomspace(1, 11, 3) = [1, 3.3, 11] -> buckets ranks 1-2 and 3-10
    assert log_rank_buckets(10, 2).tolist() == [1, 3, 11]
    r = experts_by_frequency(ROUTING, TOKENS, COUNTS, num_buckets=2)
    assert r["rank_lo"].tolist() == [1, 3] and r["rank_hi"].tolist() == [2, 10]
    assert r["count_hi"].tolist() == [100, 10] and r["count_lo"].tolist() == [50, 0]
    # bucket 0: tokens 0, 2, 4 (id 5) and 5 (id 2); bucket 1: token 1 (id 7), token 3 (id 9)
    assert r["occurrences"].tolist() == [4, 2] and r["types"].tolist() == [2, 2]
    np.testing.assert_allclose(r["per_layer"], [[(2 + 3 + 1 + 1) / 4, 1], [(1 + 0) / 2, 1]])
    np.testing.assert_allclose(r["mean"], [(7 / 4 + 1) / 2, (0.5 + 1) / 2])
    assert -1 <= r["corr"] <= 1
    # an empty bucket is NaN, not 0
    r = experts_by_frequency(ROUTING, TOKENS, COUNTS, num_buckets=4)
    assert np.isnan(r["mean"][r["occurrences"] == 0]).all()


def test_top_tokens_hand_count():
    top = top_tokens_per_expert(ROUTING, TOKENS, top=10, vocab_size=10)
    by = {(l, e): items for l, e, items in top}
    # layer 2, expert 0: tokens 0 (id 5), 1 (id 7), 2 (id 5), 5 (id 2)
    # -> id 5 twice, then ids 2 and 7 (ties by id)
    assert [(t, c) for t, c, _, _ in by[(0, 0)]] == [(5, 2), (2, 1), (7, 1)]
    t, c, s_e, s_t = by[(0, 0)][0]
    assert s_e == pytest.approx(2 / 4) and s_t == pytest.approx(2 / 3)  # id 5 occurs 3 times
    assert by[(0, 3)] == []  # dead expert
    assert [(t, c) for t, c, _, _ in by[(1, 2)]] == [(5, 3), (2, 1), (7, 1), (9, 1)]
    assert len(top_tokens_per_expert(ROUTING, TOKENS, top=1, vocab_size=10)[0][2]) == 1


def _cap(label, routing, top1):
    return RoutingCapture(label, [1], routing.shape[2], routing, np.array(top1, np.int16),
                          np.arange(routing.shape[1]), np.zeros(routing.shape[1], np.int64), ["d"])


def test_flip_rate_hand_made():
    a = np.array([L2], dtype=bool)
    b = a.copy()
    b[0, 0] = [1, 0, 0, 0]  # set changes, top-1 (expert 0) does not
    b[0, 3] = [0, 0, 0, 1]  # zero experts -> expert 3: set and top-1 change
    top_a = [[0, 0, 2, -1, 1, 0]]
    top_b = [[0, 0, 2, 3, 1, 0]]
    (row,) = flip_rates(_cap("a", a, top_a), _cap("b", b, top_b))
    assert row["layer"] == 1 and row["tokens"] == 6
    assert row["set_flip_rate"] == pytest.approx(2 / 6)
    assert row["top1_flip_rate"] == pytest.approx(1 / 6)
    assert flip_rates(_cap("a", a, top_a), _cap("a2", a.copy(), top_a))[0]["set_flip_rate"] == 0


def test_flip_rate_topk1_equals_top1_flips():
    e_a = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    e_b = np.array([0, 1, 3, 3, 1, 1, 2, 0])  # 3 of 8 change
    a = np.eye(4, dtype=bool)[e_a][None]
    b = np.eye(4, dtype=bool)[e_b][None]
    (row,) = flip_rates(_cap("a", a, [e_a]), _cap("b", b, [e_b]))
    assert row["set_flip_rate"] == row["top1_flip_rate"] == pytest.approx(3 / 8)


def test_flip_rate_refuses_mismatched_models():
    a = np.array([L2], dtype=bool)
    b = np.zeros((1, 6, 8), dtype=bool)
    with pytest.raises(AnalysisError, match="same MoE layers and experts"):
        flip_rates(_cap("a", a, [[0] * 6]), _cap("b", b, [[0] * 6]))
