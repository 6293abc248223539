"""selection.py against references: brute-force k-center, exact D^2 probabilities, scikit-learn's
kmeans_plusplus; backend, chunk and precision equivalences; the edge cases of issue 4."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy import stats

from alges_dist.selection import rules as sel
from alges_dist.selection import TimeGap
from alges_dist.selection import knn
from alges_dist.selection import PICK_RULES, kcenter_greedy, kmeanspp, random, select, top_k

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def gaussian_pool(n=300, d=16, n_labeled=20, seed=0):
    """Continuous random rows: no two candidate distances within float32 rounding (no near-ties)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    labeled = np.zeros(n, bool)
    labeled[rng.choice(n, n_labeled, replace=False)] = True
    return x, labeled


def bruteforce_kcenter(x, labeled, budget):
    """O(N^2) float64 farthest-first with the engine's rules (start: largest norm; ties: lowest index)."""
    dist = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))  # (N, N)
    if labeled.any():
        min_d, picks, radii = dist[:, labeled].min(1), [], []
    else:
        first = int(np.argmax((x**2).sum(1)))
        min_d, picks, radii = dist[first].copy(), [first], [np.inf]
    while len(picks) < budget:
        i = int(np.argmax(min_d))
        picks.append(i)
        radii.append(min_d[i])
        min_d = np.minimum(min_d, dist[i])
    return np.array(picks), np.array(radii)


def covering_radius(x, centers):
    """max_i min_c ||x_i - x_c|| in float64."""
    return np.sqrt(((x[:, None, :] - x[None, centers, :]) ** 2).sum(-1).min(1).max())


def squared_distances_to(x, centers):
    return ((x[:, None, :] - x[None, centers, :]) ** 2).sum(-1).min(1)


# ---- k-center greedy ---------------------------------------------------------------------------
@pytest.mark.parametrize("n_labeled", [20, 0], ids=["labeled", "no-labeled"])
@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_kcenter_greedy_equals_bruteforce_numpy(n_labeled, backend, seed):
    x, labeled = gaussian_pool(n_labeled=n_labeled, seed=seed)
    ref_picks, ref_radii = bruteforce_kcenter(x, labeled, 60)
    got = kcenter_greedy(x.astype(np.float32), labeled, 60, backend=backend)
    np.testing.assert_array_equal(got.indices, ref_picks)
    np.testing.assert_allclose(got.radii, ref_radii, rtol=1e-5)
    assert got.indices.dtype == np.int64 and got.radii.dtype == np.float32 and got.backend == backend


def test_kcenter_greedy_without_labeled_starts_at_largest_norm_row():
    x, _ = gaussian_pool(n=200)
    x[137] *= 10
    got = kcenter_greedy(x, np.zeros(200, bool), 5)
    assert got.indices[0] == 137 and got.radii[0] == np.inf
    assert np.all(np.isfinite(got.radii[1:]))


def test_faiss_and_torch_backends_agree():
    x, labeled = gaussian_pool(n=2000, d=32, n_labeled=100)
    x = x.astype(np.float32)
    faiss_sel = kcenter_greedy(x, labeled, 100, backend="faiss", chunk_size=512)
    torch_sel = kcenter_greedy(x, labeled, 100, backend="torch", chunk_size=512)
    np.testing.assert_array_equal(faiss_sel.indices, torch_sel.indices)
    np.testing.assert_allclose(faiss_sel.radii, torch_sel.radii, rtol=1e-5)
    km_faiss = kmeanspp(x, labeled, 50, seed=3, backend="faiss", local_trials="auto")
    km_torch = kmeanspp(x, labeled, 50, seed=3, backend="torch", local_trials="auto")
    np.testing.assert_array_equal(km_faiss.indices, km_torch.indices)


@pytest.mark.parametrize("method", ["kcenter", "kmeans++"])
def test_chunked_equals_whole(method):
    x, labeled = gaussian_pool(n=1000, d=24, n_labeled=150)
    whole = select(method, x, labeled, 80, seed=4, chunk_size=4096)
    chunked = select(method, x, labeled, 80, seed=4, chunk_size=61)  # ragged blocks of rows and labeled
    np.testing.assert_array_equal(chunked.indices, whole.indices)
    np.testing.assert_allclose(chunked.radii, whole.radii, rtol=1e-6)


@pytest.mark.parametrize("method", ["kcenter", "kmeans++"])
def test_float32_matches_float64(method):
    x, labeled = gaussian_pool(n=1000, d=24, n_labeled=50)
    f32 = select(method, x, labeled, 80, seed=1, storage_dtype=torch.float32)
    f64 = select(method, x, labeled, 80, seed=1, storage_dtype="float64")
    np.testing.assert_array_equal(f32.indices, f64.indices)
    np.testing.assert_allclose(f32.radii, f64.radii, rtol=1e-5)
    exact = np.sqrt(squared_distances_to(x, np.flatnonzero(labeled))[f64.indices[0]])
    np.testing.assert_allclose(f64.radii[0], exact, rtol=1e-6)  # radii are float32


@pytest.mark.parametrize("storage_dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("offset", [0.0, 50.0], ids=["centered", "far-from-origin"])
def test_half_storage_covering_radius_close_to_float32(storage_dtype, offset):
    """Half storage reads half the bytes; its picks keep the float32 covering radius within 2%
    and its reported radii within 1% of the exact ones, also for data far from the origin
    (where ||x||^2 - 2 x.c + ||c||^2 in half precision would cancel catastrophically)."""
    rng = np.random.default_rng(7)
    centers = rng.normal(size=(40, 32)) * 3
    x = (centers[rng.integers(0, 40, 3000)] + rng.normal(size=(3000, 32)) * 0.5 + offset).astype(np.float32)
    labeled = np.zeros(3000, bool)
    labeled[:30] = True
    full = kcenter_greedy(x, labeled, 120)
    half = kcenter_greedy(x, labeled, 120, storage_dtype=storage_dtype)
    x64 = x.astype(np.float64)
    r_full = covering_radius(x64, np.r_[np.flatnonzero(labeled), full.indices])
    r_half = covering_radius(x64, np.r_[np.flatnonzero(labeled), half.indices])
    assert abs(r_half / r_full - 1) < 0.02
    chosen = np.flatnonzero(labeled).tolist()
    exact = []
    for i in half.indices:
        exact.append(np.sqrt(((x64[chosen] - x64[i]) ** 2).sum(1).min()))
        chosen.append(i)
    np.testing.assert_allclose(half.radii, exact, rtol=0.01)


# ---- k-means++ --------------------------------------------------------------------------------------
def test_kmeanspp_pick_pairs_follow_d2_sampling():
    """The first two picks, over 2000 seeds, against exact D^2 probabilities (chi-square, 20 cells)."""
    rng = np.random.default_rng(11)
    x = rng.normal(size=(7, 3)) * np.array([1.0, 2.0, 3.0])
    labeled = np.zeros(7, bool)
    labeled[[0, 1]] = True
    cand = np.flatnonzero(~labeled)
    d2 = squared_distances_to(x, [0, 1])
    expected = {}
    for i, j in itertools.permutations(cand, 2):
        d2_after = np.minimum(d2, ((x - x[i]) ** 2).sum(1))
        expected[(i, j)] = d2[i] / d2.sum() * d2_after[j] / d2_after.sum()
    counts = dict.fromkeys(expected, 0)
    n_draws = 2000
    for s in range(n_draws):
        picks = kmeanspp(x, labeled, 2, seed=s).indices
        counts[tuple(picks)] += 1
    keys = list(expected)
    observed = np.array([counts[k] for k in keys])
    exp = np.array([expected[k] for k in keys]) * n_draws
    assert abs(exp.sum() - n_draws) < 1e-6 and exp.min() > 5  # chi-square needs >= 5 expected per cell
    chi2 = ((observed - exp) ** 2 / exp).sum()
    assert chi2 < stats.chi2.ppf(0.999, df=len(keys) - 1), (chi2, observed, exp.round(1))


def test_kmeanspp_local_trials_matches_sklearn_picks_where_rng_allows():
    """With many trials greedy k-means++ keeps the best-potential candidate, which both draw:
    once the random first centers agree, the picks agree (sklearn's first center is its
    own RNG's: we search random_state for the same first center)."""
    from sklearn.cluster import kmeans_plusplus

    rng = np.random.default_rng(5)
    x = rng.normal(size=(30, 4)) * np.array([1.0, 1.5, 2.0, 3.0])
    ours = kmeanspp(x, np.zeros(30, bool), 8, seed=0, local_trials=400)
    for state in range(500):
        _, ref = kmeans_plusplus(x, 8, random_state=state, n_local_trials=400)
        if ref[0] == ours.indices[0]:
            break
    else:
        pytest.fail("no random_state gave scikit-learn the same first center")
    np.testing.assert_array_equal(ours.indices, ref)


def test_kmeanspp_local_trials_potential_comparable_to_sklearn():
    """Greedy seeding quality (D^2 potential of the seeds) matches scikit-learn's over 5 seeds and
    beats plain D^2 sampling."""
    from sklearn.cluster import kmeans_plusplus
    from sklearn.datasets import make_blobs

    x, _ = make_blobs(n_samples=2000, centers=25, n_features=8, cluster_std=1.5, random_state=0)
    none = np.zeros(len(x), bool)
    ours = [squared_distances_to(x, kmeanspp(x, none, 25, seed=s, local_trials="auto").indices).sum() for s in range(5)]
    plain = [squared_distances_to(x, kmeanspp(x, none, 25, seed=s).indices).sum() for s in range(5)]
    ref = [squared_distances_to(x, kmeans_plusplus(x, 25, random_state=s)[1]).sum() for s in range(5)]
    assert 0.85 < np.mean(ours) / np.mean(ref) < 1.15
    assert np.mean(ours) < np.mean(plain)


def test_kmeanspp_one_local_trial_equals_plain_d2_sampling():
    x, labeled = gaussian_pool()
    np.testing.assert_array_equal(kmeanspp(x, labeled, 30, seed=2, local_trials=1).indices,
                                  kmeanspp(x, labeled, 30, seed=2).indices)


def test_kmeanspp_without_labeled_starts_at_seeded_random_row():
    x, _ = gaussian_pool(n=200)
    none = np.zeros(200, bool)
    firsts = [kmeanspp(x, none, 3, seed=s).indices[0] for s in range(8)]
    assert len(set(firsts)) > 4  # seeded random, not a fixed row such as 0
    assert kmeanspp(x, none, 3, seed=5).indices[0] == kmeanspp(x, none, 3, seed=5).indices[0]
    assert kmeanspp(x, none, 3, seed=5).radii[0] == np.inf


# ---- edge cases ------------------------------------------------------------------------------
@pytest.mark.parametrize("method", list(PICK_RULES))
def test_budget_at_least_unlabeled_returns_all_unlabeled_with_warning(method):
    x, labeled = gaussian_pool(n=40, n_labeled=10)
    with pytest.warns(UserWarning, match="budget 50 >= the 30 unlabeled rows: selecting all of them"):
        got = select(method, x[:, 0] if method == "top-k" else x, labeled, 50, seed=0)
    assert sorted(got.indices) == np.flatnonzero(~labeled).tolist()


@pytest.mark.parametrize("method", ["kcenter", "kmeans++"])
def test_duplicates_fill_with_seeded_random_picks(method):
    rng = np.random.default_rng(0)
    distinct = rng.normal(size=(5, 8))
    x = np.repeat(distinct, 4, axis=0)  # 20 rows, 5 distinct
    labeled = np.zeros(20, bool)
    labeled[0] = True  # covers rows 0-3
    got = select(method, x, labeled, 12, seed=3)
    assert len(set(got.indices)) == 12 and not labeled[got.indices].any()
    assert sorted({i // 4 for i in got.indices[:4]}) == [1, 2, 3, 4]  # one per uncovered point first
    assert np.all(got.radii[:4] > 0) and np.all(got.radii[4:] == 0)
    assert got.n_random_fill == 8
    again, other = select(method, x, labeled, 12, seed=3), select(method, x, labeled, 12, seed=4)
    np.testing.assert_array_equal(got.indices, again.indices)
    assert not np.array_equal(got.indices[4:], other.indices[4:])


@pytest.mark.parametrize("method", ["kcenter", "kmeans++"])
def test_nonfinite_rows_raise_naming_them(method):
    x, labeled = gaussian_pool()
    x[17, 3], x[3, 0], x[250, 1] = np.nan, np.inf, -np.inf
    with pytest.raises(ValueError, match=r"NaN or inf in 3 rows \(first: \[3, 17, 250\]\)"):
        select(method, x, labeled, 5, chunk_size=16)


def test_nonfinite_scores_raise_naming_them():
    with pytest.raises(ValueError, match=r"score has NaN or inf in 1 rows \(first: \[2\]\)"):
        top_k(np.array([0.1, 0.2, np.nan]), np.zeros(3, bool), 1)


@pytest.mark.parametrize("budget", [0, -3, 2.5, True])
@pytest.mark.parametrize("method", list(PICK_RULES))
def test_nonpositive_budget_raises(method, budget):
    x, labeled = gaussian_pool(n=30, n_labeled=3)
    with pytest.raises(ValueError, match="budget must be a positive integer"):
        select(method, x[:, 0] if method == "top-k" else x, labeled, budget)


def test_unknown_method_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown pick rule 'badge'; valid: \['kcenter', 'kmeans\+\+', "
                                         r"'top-k', 'random'\]"):
        select("badge", None, np.zeros(3, bool), 1)


def test_bad_inputs_raise():
    x, labeled = gaussian_pool(n=30, n_labeled=3)
    with pytest.raises(ValueError, match=r"labeled_mask must be a boolean array of shape \(30,\)"):
        kcenter_greedy(x, labeled.astype(int), 3)
    with pytest.raises(ValueError, match="x must be a floating"):
        kcenter_greedy(x.astype(int), labeled, 3)
    with pytest.raises(ValueError, match="storage_dtype must be one of"):
        kcenter_greedy(x, labeled, 3, storage_dtype="int8")
    with pytest.raises(ValueError, match="backend must be one of"):
        kcenter_greedy(x, labeled, 3, backend="annoy")
    with pytest.raises(ValueError, match="local_trials must be None, 'auto' or an integer >= 1"):
        kmeanspp(x, labeled, 3, seed=0, local_trials=0)
    with pytest.raises(ValueError, match="pick rule 'top-k' needs values"):
        select("top-k", None, labeled, 3)
    with pytest.raises(ValueError, match="pick rule 'random' does not take option"):
        select("random", None, labeled, 3, device="cpu")


# ---- score and random baselines ---------------------------------------------------------------------
def test_top_k_ranks_unlabeled_by_score():
    score = np.array([0.5, 0.9, 0.1, 0.9, 0.7, 0.3])
    labeled = np.array([False, True, False, False, False, False])
    np.testing.assert_array_equal(top_k(score, labeled, 3).indices, [3, 4, 0])
    np.testing.assert_array_equal(top_k(torch.tensor(score), labeled, 2, largest=False).indices, [2, 5])
    assert np.isnan(top_k(score, labeled, 3).radii).all()


def test_random_is_seeded_and_skips_labeled():
    labeled = np.zeros(100, bool)
    labeled[::3] = True
    a, b, c = random(None, labeled, 20, seed=0), random(None, labeled, 20, seed=0), random(None, labeled, 20, seed=1)
    np.testing.assert_array_equal(a.indices, b.indices)
    assert not np.array_equal(a.indices, c.indices)
    assert len(set(a.indices)) == 20 and not labeled[a.indices].any()


def test_select_dispatches_to_the_method():
    x, labeled = gaussian_pool()
    np.testing.assert_array_equal(select("kcenter", x, labeled, 10).indices, kcenter_greedy(x, labeled, 10).indices)
    np.testing.assert_array_equal(select("kmeans++", x, labeled, 10, seed=3, local_trials=2).indices,
                                  kmeanspp(x, labeled, 10, seed=3, local_trials=2).indices)


# ---- CUDA -----------------------------------------------------------------------------------------
@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("storage_dtype", ["float32", "bfloat16"])
def test_cuda_matches_cpu(storage_dtype):
    x, labeled = gaussian_pool(n=3000, d=32, n_labeled=100)
    x = x.astype(np.float32)
    for method in ("kcenter", "kmeans++"):
        cpu = select(method, x, labeled, 100, seed=2, device="cpu", storage_dtype=storage_dtype)
        gpu = select(method, torch.from_numpy(x).cuda(), labeled, 100, seed=2, device="auto",
                     storage_dtype=storage_dtype, backend="torch")
        assert (gpu.indices == cpu.indices).mean() > (0.99 if storage_dtype == "float32" else 0.8)
        np.testing.assert_allclose(gpu.radii[-1], cpu.radii[-1], rtol=1e-2)


@cuda
@pytest.mark.gpu
def test_cuda_faiss_backend_agrees_with_torch():
    if not knn.faiss_has_gpu():
        pytest.skip("faiss has no GPU support in this environment")
    x, labeled = gaussian_pool(n=5000, d=32, n_labeled=300)
    x = torch.from_numpy(x.astype(np.float32)).cuda()
    a = kcenter_greedy(x, labeled, 100, backend="faiss", chunk_size=1000)
    b = kcenter_greedy(x, labeled, 100, backend="torch", chunk_size=1000)
    np.testing.assert_array_equal(a.indices, b.indices)


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("local_trials", [None, 3])
def test_cuda_greedy_loops_never_sync_the_host(local_trials):
    x, labeled = gaussian_pool(n=3000, d=32, n_labeled=100)
    gap = TimeGap(np.arange(3000) // 100, np.arange(3000) % 100 * 1.0, 3.0)  # the gap's masks too
    pool = sel.device_pool(x, device="cuda", backend="torch", storage_dtype="float32", chunk_size=1024, gap=gap)
    u = sel.kmeanspp_uniforms(50, 1 if local_trials is None else local_trials, 0).cuda()
    for loop in (lambda: sel._kcenter_loop(pool, 50), lambda: sel._kmeanspp_loop(pool, 50, u)):
        pool.start(labeled)  # the labeled kNN may sync; the loops may not
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            loop()
        finally:
            torch.cuda.set_sync_debug_mode(0)


# ---- the time gap (selection.min_gap_s) --------------------------------------------------------------
def video_gap(n, per_video=50, gap_s=4.0):
    """Rows are frames of videos of ``per_video`` seconds at 1 fps."""
    return TimeGap(np.arange(n) // per_video, (np.arange(n) % per_video) * 1.0, gap_s)


def too_close(gap, rows):
    """Pairs (brute force) of rows of one video closer than the gap."""
    g, t = gap.group[rows], gap.seconds[rows]
    close = (g[:, None] == g[None, :]) & (np.abs(t[:, None] - t[None, :]) < gap.gap_s)
    np.fill_diagonal(close, False)
    return np.argwhere(close)


def bruteforce_kcenter_with_gap(x, labeled, budget, gap):
    """O(N^2) farthest-first where rows near a labeled row or a pick are out of the race."""
    dist = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    near = lambda rows: np.array([(gap.group == gap.group[r]) & (np.abs(gap.seconds - gap.seconds[r]) < gap.gap_s)
                                  for r in rows]).any(0)
    out = near(np.flatnonzero(labeled)) | labeled
    min_d, picks = dist[:, labeled].min(1), []
    while len(picks) < budget:
        i = int(np.argmax(np.where(out, -1, min_d)))
        picks.append(i)
        min_d = np.minimum(min_d, dist[i])
        out |= near([i])
    return np.array(picks)


def test_kcenter_with_time_gap_equals_bruteforce():
    x, labeled = gaussian_pool(n=300, n_labeled=10)
    gap = video_gap(300)
    got = kcenter_greedy(x, labeled, 40, gap=gap)
    np.testing.assert_array_equal(got.indices, bruteforce_kcenter_with_gap(x, labeled, 40, gap))


@pytest.mark.parametrize("rule", list(PICK_RULES))
def test_every_rule_keeps_picks_apart_in_time_and_from_labeled_frames(rule):
    x, labeled = gaussian_pool(n=300, n_labeled=10)
    gap = video_gap(300)
    values = x[:, 0] if rule == "top-k" else x
    plain = select(rule, values, labeled, 40, seed=1)
    got = select(rule, values, labeled, 40, seed=1, gap=gap)
    assert len(set(got.indices)) == 40 and not labeled[got.indices].any()
    assert too_close(gap, got.indices).size == 0
    assert not gap.near(np.flatnonzero(labeled))[got.indices].any()
    # without the gap every rule does pick neighbours, and frames next to labeled ones, on this
    # pool: the gap is what kept them apart (issue 23.12: this held only for top-k before)
    assert too_close(gap, plain.indices).size > 0
    assert gap.near(np.flatnonzero(labeled))[plain.indices].any()


def test_time_gap_that_leaves_too_few_frames_says_so():
    x, labeled = gaussian_pool(n=100, n_labeled=0)
    gap = video_gap(100, per_video=50, gap_s=30.0)  # at most 2 frames per 50-s video, 4 in all
    for rule in PICK_RULES:
        with pytest.raises(ValueError, match="min_gap_s=30.0"):
            select(rule, x[:, 0] if rule == "top-k" else x, labeled, 6, seed=0, gap=gap)


def test_split_targets_is_one_devices_inverse_cdf_shard_by_shard():
    from alges_dist.selection.shard_worker import split_targets

    weights = [2.0, 0.0, 6.0]  # one device: rows of mass 2 | 6 on one cumulative axis [0, 8)
    u = np.array([0.0, 0.2, 0.25, 0.26, 0.99])
    owners, local = split_targets(u, weights)
    np.testing.assert_array_equal(owners, [0, 0, 2, 2, 2])  # never the empty shard
    np.testing.assert_allclose(local, [0.0, 1.6, 0.0, 0.08, 5.92])
    owners, local = split_targets(np.array([0.5]), [0.0, 0.0])  # nothing left: clamped, never past the last shard
    assert owners.tolist() == [1] and local.tolist() == [0.0]
