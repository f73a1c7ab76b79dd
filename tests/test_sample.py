import numpy as np
import pytest

from refine.errors import RefineError
from refine.sample import n_kept, select_top_fraction


def test_n_kept_is_exact_ceiling():
    assert n_kept(10, 0.3) == 3  # 0.3 * 10 = 3.0000000000000004 in floats
    assert n_kept(10, 0.35) == 4
    assert n_kept(7, 1.0) == 7
    assert n_kept(3, 0.01) == 1
    assert n_kept(1000, 0.7) == 700


def test_top_fraction_exact_with_ties_broken_by_id():
    keys = np.array([0.5, 2.0, 1.0, 2.0, 1.0, 1.0, -3.0, 2.0])
    ids = np.array([10, 7, 3, 2, 9, 1, 0, 5])
    # alpha=0.5 keeps 4: the three 2.0s (ids 2, 5, 7), then the 1.0 with the smallest id (id 1 at index 5)
    kept = select_top_fraction(keys, ids, 0.5)
    assert kept.tolist() == [1, 3, 5, 7]
    assert select_top_fraction(keys, ids, 0.375).tolist() == [1, 3, 7]
    assert select_top_fraction(keys, ids, 1.0).tolist() == list(range(8))
    assert select_top_fraction(keys, ids, 0.01).tolist() == [3]  # id 2 wins the tie at the top


def test_top_fraction_string_ids_and_order_independence():
    keys = np.array([1.0, 1.0, 1.0, 0.0])
    ids = np.array(["b", "c", "a", "d"])
    assert select_top_fraction(keys, ids, 0.5).tolist() == [0, 2]  # "a" and "b"
    perm = np.random.default_rng(0).permutation(4)
    kept_ids = set(ids[perm][select_top_fraction(keys[perm], ids[perm], 0.5)])
    assert kept_ids == {"a", "b"}


def test_nan_scores_are_refused():
    with pytest.raises(RefineError, match="NaN"):
        select_top_fraction(np.array([1.0, np.nan]), np.array([0, 1]), 0.5)
