import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from s2l_guard.metrics import bootstrap, bootstrap_mean, nearest, tiled_l2


def straightforward_tiled_l2(x, y, grid):
    """Carlini et al.'s definition, one pair and one tile at a time."""
    _, h, w = x.shape
    th, tw = h // grid, w // grid
    worst = 0.0
    for i in range(grid):
        for j in range(grid):
            a = x[:, i * th : (i + 1) * th, j * tw : (j + 1) * tw]
            b = y[:, i * th : (i + 1) * th, j * tw : (j + 1) * tw]
            worst = max(worst, math.sqrt(float(((a - b) ** 2).mean())))
    return worst


@pytest.mark.parametrize("grid", [1, 2, 4])
def test_tiled_l2_matches_the_definition(grid):
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 3, 8, 8, generator=g), torch.rand(4, 3, 8, 8, generator=g)
    d = tiled_l2(a, b, grid=grid)
    for i in range(3):
        for j in range(4):
            assert d[i, j].item() == pytest.approx(straightforward_tiled_l2(a[i], b[j], grid), abs=1e-6)


def test_known_value():
    a, b = torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)
    b[0, 0, 0, 0] = 1.0  # one pixel off by 1 in the top-left 2x2 tile
    assert tiled_l2(a, b, grid=1).item() == pytest.approx(0.25)  # sqrt(1/16)
    assert tiled_l2(a, b, grid=2).item() == pytest.approx(0.5)  # sqrt(1/4)


images = st.integers(1, 4).flatmap(
    lambda n: st.lists(st.floats(0, 1, width=32), min_size=n * 64, max_size=n * 64).map(lambda v, n=n: torch.tensor(v).reshape(n, 1, 8, 8))
)


@settings(max_examples=40, deadline=None)
@given(a=images, b=images, grid=st.sampled_from([1, 2, 4]), seed=st.integers(0, 1000))
def test_tiled_l2_properties(a, b, grid, seed):
    assert torch.allclose(tiled_l2(a, a, grid=grid).diagonal(), torch.zeros(len(a)), atol=1e-3)
    assert torch.allclose(tiled_l2(a, b, grid=grid), tiled_l2(b, a, grid=grid).T, atol=1e-6)
    # Permuting the tiles of both images the same way leaves the distance unchanged.
    perm = torch.randperm(grid * grid, generator=torch.Generator().manual_seed(seed))

    def shuffle(x):
        t = x.reshape(len(x), 1, grid, 8 // grid, grid, 8 // grid).permute(0, 1, 2, 4, 3, 5).reshape(len(x), 1, grid * grid, 8 // grid, 8 // grid)
        t = t[:, :, perm].reshape(len(x), 1, grid, grid, 8 // grid, 8 // grid).permute(0, 1, 2, 4, 3, 5)
        return t.reshape(len(x), 1, 8, 8)

    assert torch.allclose(tiled_l2(shuffle(a), shuffle(b), grid=grid), tiled_l2(a, b, grid=grid), atol=1e-6)


def test_nearest_is_chunk_independent():
    g = torch.Generator().manual_seed(1)
    q, r = torch.rand(50, 1, 8, 8, generator=g), torch.rand(30, 1, 8, 8, generator=g)
    d1, i1 = nearest(q, r, chunk=7)
    d2, i2 = nearest(q, r, chunk=1000)
    assert torch.equal(i1, i2) and torch.allclose(d1, d2)
    assert torch.allclose(d1, tiled_l2(q, r).min(1).values)


def test_bootstrap_interval_covers_the_estimate_and_is_seeded():
    x = np.random.default_rng(0).normal(1.0, 1.0, 200)
    est = bootstrap(np.mean, x, resamples=500, seed=1)
    assert est.low < est.value < est.high and est.n == 200
    assert abs(est.value - 1.0) < 0.2 and est.high - est.low < 0.4
    assert bootstrap(np.mean, x, resamples=500, seed=1) == est


@given(st.lists(st.booleans(), min_size=1, max_size=60), st.integers(0, 2**31 - 1))
@settings(max_examples=40, deadline=None)
def test_vectorised_bootstrap_mean_draws_what_the_loop_draws(values, seed):
    x = np.array(values)
    assert bootstrap_mean(x, resamples=200, seed=seed) == bootstrap(np.mean, x, resamples=200, seed=seed)
