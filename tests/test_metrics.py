"""Every retrieval metric against cases worked out by hand."""

import numpy as np
import pytest

from facejax.retrieval import metrics as M

# Three queries, labels 0, 1, 2; four results each.
#   q0 (label 0): results 1 0 0 2  -> rel F T T F, 3 relevant items in the gallery
#   q1 (label 1): results 1 2 2 2  -> rel T F F F, 1 relevant item
#   q2 (label 2): results 0 0 1 1  -> rel F F F F, 2 relevant items
RETRIEVED = np.array([[1, 0, 0, 2], [1, 2, 2, 2], [0, 0, 1, 1]])
QUERY = np.array([0, 1, 2])
GALLERY = np.array([0, 0, 0, 1, 2, 2])
REL = M.relevance(RETRIEVED, QUERY)
NUM_REL = M.count_relevant(QUERY, GALLERY)


def test_relevance_and_counts():
    np.testing.assert_array_equal(REL, [[0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(NUM_REL, [3, 1, 2])
    # Leave-one-out: the query is one of the gallery items with its label.
    np.testing.assert_array_equal(M.count_relevant(GALLERY, GALLERY, leave_one_out=True),
                                  [2, 2, 2, 0, 1, 1])
    # Unlabelled (-1) queries and results never match anything.
    rel = M.relevance(np.array([[-1, 3]]), np.array([-1]))
    assert not rel.any()
    assert M.count_relevant(np.array([-1, 5]), GALLERY).tolist() == [0, 0]
    assert M.count_relevant(np.array([-1]), np.array([-1, -1])).tolist() == [0]


def test_hit_at_k():
    np.testing.assert_array_equal(M.hit_at_k(REL, 1), [0, 1, 0])
    np.testing.assert_array_equal(M.hit_at_k(REL, 2), [1, 1, 0])
    np.testing.assert_array_equal(M.hit_at_k(REL, 4), [1, 1, 0])


def test_precision_at_k():
    np.testing.assert_allclose(M.precision_at_k(REL, 1), [0, 1, 0])
    np.testing.assert_allclose(M.precision_at_k(REL, 3), [2 / 3, 1 / 3, 0])
    np.testing.assert_allclose(M.precision_at_k(REL, 4), [0.5, 0.25, 0])


def test_recall_at_k():
    np.testing.assert_allclose(M.recall_at_k(REL, NUM_REL, 1), [0, 1, 0])
    np.testing.assert_allclose(M.recall_at_k(REL, NUM_REL, 3), [2 / 3, 1, 0])
    assert np.isnan(M.recall_at_k(REL[:1], np.array([0]), 2)[0])


def test_f1_at_k():
    # q0 at k=3: p = 2/3, r = 2/3 -> 2/3; q1: p = 1/3, r = 1 -> 0.5; q2: 0.
    np.testing.assert_allclose(M.f1_at_k(REL, NUM_REL, 3), [2 / 3, 0.5, 0])
    # q0 at k=4: p = 1/2, r = 2/3 -> 2*(1/3)/(7/6) = 4/7.
    np.testing.assert_allclose(M.f1_at_k(REL, NUM_REL, 4)[0], 4 / 7)


def test_map_at_r():
    # q0: R=3, top-3 rel F T T -> (0 + 1/2 + 2/3) / 3 = 7/18.
    # q1: R=1, top-1 rel T -> 1.  q2: R=2, nothing -> 0.
    np.testing.assert_allclose(M.average_precision_at_r(REL, NUM_REL), [7 / 18, 1, 0])
    # A relevant hit past rank R does not count: q1 with R=1 and the hit at rank 2.
    rel = np.array([[False, True, False]])
    assert M.average_precision_at_r(rel, np.array([1]))[0] == 0
    # Perfect ranking gives 1.
    assert M.average_precision_at_r(np.array([[True, True, False]]), np.array([2]))[0] == 1


def test_ann_recall():
    exact = np.array([[0, 1, 2], [3, 4, 5]])
    approx = np.array([[2, 1, 9], [3, -1, -1]])
    assert M.ann_recall_at_k(approx, exact, 3) == pytest.approx(3 / 6)
    assert M.ann_recall_at_k(approx, exact, 1) == pytest.approx(1 / 2)


def test_summaries_and_per_class():
    per_q = M.per_query_metrics(REL, NUM_REL, (1, 3))
    valid = NUM_REL > 0
    s = M.summarize(per_q, valid)
    assert s["top1"] == pytest.approx(1 / 3)
    assert s["top3"] == pytest.approx(2 / 3)
    assert s["precision@3"] == pytest.approx((2 / 3 + 1 / 3) / 3)
    assert s["map@r"] == pytest.approx((7 / 18 + 1) / 3)
    rows = M.per_class(per_q, QUERY, valid, names={0: "a", 1: "b", 2: "c"})
    assert [r["name"] for r in rows] == ["a", "b", "c"]
    assert rows[1]["top1"] == 1 and rows[0]["queries"] == 1
    with pytest.raises(ValueError, match="k=5"):
        M.hit_at_k(REL, 5)
