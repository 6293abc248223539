"""Sharded selection (2 local Ray actors) picks exactly what the single-device engine picks."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from alges_dist.selection import kcenter_greedy, kmeanspp
from alges_dist.selection import TimeGap

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture
def sharded(ray_local):
    from alges_dist.distributed.sharded_selection import ShardedPool

    return ShardedPool


def pool(n=600, d=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    labeled = np.zeros(n, bool)
    labeled[rng.choice(n, 40, replace=False)] = True
    return x, labeled


def assert_same(a, b):
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.radii, b.radii)
    assert a.n_random_fill == b.n_random_fill


@pytest.mark.parametrize("storage_dtype", ["float32", "bfloat16"])
def test_sharded_selection_equals_single_device(sharded, storage_dtype):
    x, labeled = pool()
    opts = {"storage_dtype": storage_dtype, "chunk_size": 128}
    with sharded([x[:250], x[250:]], **opts) as sh:  # one pool, several selections: each starts afresh
        for mask in (labeled, np.zeros_like(labeled)):
            assert_same(kcenter_greedy(sh, mask, 30, seed=1), kcenter_greedy(x, mask, 30, seed=1, **opts))
            for local_trials in (None, 3):
                assert_same(kmeanspp(sh, mask, 30, seed=7, local_trials=local_trials),
                            kmeanspp(x, mask, 30, seed=7, local_trials=local_trials, **opts))


def test_sharded_time_gap_equals_single_device(sharded):
    x, labeled = pool()
    gap = TimeGap(np.arange(600) // 50, (np.arange(600) % 50) * 1.0, 4.0)  # 12 videos of 50 s
    with sharded([x[:333], x[333:]], gap=gap) as sh:
        for rule in (kcenter_greedy, kmeanspp):
            assert_same(rule(sh, labeled, 40, seed=3), rule(x, labeled, 40, seed=3, gap=gap))


@pytest.mark.parametrize("rule", [kcenter_greedy, kmeanspp])
def test_a_time_gap_that_leaves_no_candidate_fails_alike_sharded_and_on_one_device(sharded, rule):
    # issue 23.3: sharded k-means++ raised IndexError (shard index == number of shards) instead
    x, labeled = pool(n=120)
    gap = TimeGap(np.zeros(120, np.int64), np.arange(120) * 1.0, 30.0)  # one video of 120 s: room for ~4 picks
    messages = []
    for values in (x, None):
        with sharded([x[:60], x[60:]], gap=gap) if values is None else contextlib.nullcontext() as sh:
            with pytest.raises(ValueError, match="min_gap_s=30.0") as err:
                rule(x if values is not None else sh, np.zeros(120, bool), 10, seed=0,
                     **({"gap": gap} if values is not None else {}))
            messages.append(str(err.value))
    assert messages[0] == messages[1]


def test_sharded_random_fill_and_budget_checks_equal_single_device(sharded):
    rng = np.random.default_rng(2)
    x = np.repeat(rng.normal(size=(6, 8)).astype(np.float32), 5, axis=0)  # 30 rows, 6 distinct
    labeled = np.zeros(30, bool)
    labeled[[0, 29]] = True
    with sharded([x[:13], x[13:]]) as sh:
        a, b = kcenter_greedy(sh, labeled, 15, seed=5), kcenter_greedy(x, labeled, 15, seed=5)
        assert_same(a, b)
        assert a.n_random_fill == 11
        assert_same(kmeanspp(sh, labeled, 15, seed=5), kmeanspp(x, labeled, 15, seed=5))
        with pytest.raises(ValueError, match="budget must be a positive integer"):
            kcenter_greedy(sh, labeled, 0)
        with pytest.warns(UserWarning, match="budget 40 >= the 28 unlabeled rows"):
            got = kmeanspp(sh, labeled, 40, seed=0)
        assert sorted(got.indices) == np.flatnonzero(~labeled).tolist()
        with pytest.raises(ValueError, match=r"labeled_mask must be a boolean array of shape \(30,\)"):
            kcenter_greedy(sh, labeled[:20], 3)


def test_sharded_selection_rejects_nonfinite_rows_by_global_index(sharded):
    x, _ = pool(n=100)
    x[70, 2], x[5, 0] = np.nan, np.inf
    with pytest.raises(ValueError, match=r"NaN or inf in 2 rows \(first: \[5, 70\]\)"):
        sharded([x[:50], x[50:]])
