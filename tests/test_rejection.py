"""Open-set rejection figures: identities held out of the gallery play unknown people."""

import numpy as np
import pytest

from facejax.errors import ConfigError
from facejax.retrieval import rejection as RJ


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _set(num_ids=12, per_query=2, per_gallery=5, noise=0.05, seed=0):
    rng = np.random.default_rng(seed)
    centres = _unit(rng.normal(size=(num_ids, 64)))
    q_labels = np.repeat(np.arange(num_ids), per_query)
    g_labels = np.repeat(np.arange(num_ids), per_gallery)
    q = _unit(centres[q_labels] + noise * rng.normal(size=(len(q_labels), 64)))
    g = _unit(centres[g_labels] + noise * rng.normal(size=(len(g_labels), 64)))
    return q, q_labels, g, g_labels


def test_unknown_people_are_rejected_at_a_same_person_threshold():
    q, ql, g, gl = _set()
    names = {i: f"person_{i}" for i in range(12)}
    r = RJ.open_set_rejection(q, ql, g, gl, names=names, threshold=0.8,
                              threshold_source="report/verification.json", holdout=0.25)
    held = r["held_out_identities"]
    assert held >= 1 and r["known_identities"] == 12 - held
    assert r["unknown_queries"] == 2 * held and r["known_queries"] == 2 * (12 - held)
    a = r["at_threshold"]
    # Random 64-d directions score about 0 against each other, the same person about 0.99.
    assert a["rejection"] == 1.0 and a["false_accept"] == 0.0
    assert a["false_reject"] == 0.0 and a["identification"] == 1.0
    # A threshold below every score accepts every unknown person: nothing is rejected.
    low = RJ.open_set_rejection(q, ql, g, gl, names=names, threshold=-1.0, holdout=0.25)
    assert low["at_threshold"]["rejection"] == 0.0 and low["held_out_identities"] == held
    # The trade-off rows accept at most their target share of unknown people.
    for row in r["tradeoff"]:
        assert row["false_accept"] <= row["target_false_accept"]
    header, rows = RJ.table(r)
    assert rows[0][:3] == ["0.8000", "calibrated", "100.0%"] and len(rows) == 4
    line = RJ.summary_line(r)
    assert line.startswith("Open-set rejection at the calibrated threshold 0.8000 "
                           "(report/verification.json): 100.0% of unknown people correctly "
                           "rejected")


def test_a_lookalike_unknown_person_is_falsely_accepted():
    q, ql, g, gl = _set(num_ids=2, per_query=1, per_gallery=3)
    held = RJ.held_out(["a", "b"], 0.5, 0)
    unknown = int(np.flatnonzero(held)[0])
    q[unknown] = g[gl != unknown][0]  # the unknown person's photo looks like the other one
    r = RJ.open_set_rejection(q, ql, g, gl, names={0: "a", 1: "b"}, threshold=0.9, holdout=0.5)
    assert r["held_out_identities"] == 1 and r["at_threshold"]["false_accept"] == 1.0


def test_leave_one_out_skips_the_query_itself():
    q, ql, _, _ = _set(num_ids=6, per_query=3)
    r = RJ.open_set_rejection(q, ql, q, ql, self_rows=np.arange(len(q)), threshold=0.8,
                              holdout=0.3)
    # Without leaving the query out, every known query would find itself at score 1.
    assert r["at_threshold"]["identification"] == 1.0
    assert r["known_queries"] + r["unknown_queries"] == len(q)
    # A known identity with one image has nothing left to find: it is not scored.
    ql2 = ql.copy()
    ql2[:2] = -1  # two of identity 0's three images unlabelled
    r2 = RJ.open_set_rejection(q, ql2, q, ql2, self_rows=np.arange(len(q)), threshold=0.8,
                               holdout=0.3)
    assert r2["known_queries"] + r2["unknown_queries"] == len(q) - 3


def test_nothing_to_measure_and_bad_settings():
    q, ql, g, gl = _set(num_ids=1)
    assert RJ.open_set_rejection(q, ql, g, gl, threshold=0.5) is None  # one identity
    q, ql, g, gl = _set()
    assert RJ.open_set_rejection(q, ql, g, gl, holdout=0.0) is None
    r = RJ.open_set_rejection(q, ql, g, gl)  # no threshold: the trade-off only
    assert r["at_threshold"] is None and len(r["tradeoff"]) == 3
    assert "no calibrated same-person threshold" in RJ.summary_line(r)
    for bad in (1.0, -0.1, True, "0.2"):
        with pytest.raises(ConfigError, match="rejection_holdout"):
            RJ.open_set_rejection(q, ql, g, gl, holdout=bad)


def test_many_queries_are_sampled_and_say_so():
    q, ql, g, gl = _set(num_ids=20, per_query=10)
    full = RJ.open_set_rejection(q, ql, g, gl, threshold=0.8, holdout=0.3)
    part = RJ.open_set_rejection(q, ql, g, gl, threshold=0.8, holdout=0.3, max_queries=50)
    assert not full["sampled"] and full["unknown_queries"] + full["known_queries"] == 200
    assert part["sampled"] and part["unknown_queries"] + part["known_queries"] == 50
    assert part["held_out_identities"] == full["held_out_identities"]
