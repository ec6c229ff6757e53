"""The correlated-noise generator (issue 19 item 1): w = C^{-1} z exactly (float64, against a
dense solve), tree noise = the strategy's noise matrix times the node noises, the noise's
covariance across steps equals C^{-1} C^{-T} (a statistical test that rejects a factorization
with one coefficient 10% off), transactional steps, and state that never holds noise.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ppml_fast.accounting import matrix_factorization as mf
from ppml_fast.accounting.errors import PrivacyError
from ppml_fast.ops.noise import add_gaussian_noise_, blocks
from ppml_fast.privacy.correlated_noise import CorrelatedNoise

EVERY = mf.Participation("every_epoch", steps_per_epoch=4)


def _like(n=7, dtype=torch.float64):
    return [torch.zeros(n, dtype=dtype), torch.zeros(2, 3, dtype=dtype)]


def _flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def _run(gen, like, seed=11, offset=0):
    """(W: steps x P, the offsets each step started at)."""
    out, starts = [], []
    for _ in range(gen.steps):
        starts.append(offset)
        w = gen.draw(like, seed=seed, offset=offset, secure=False)
        offset += gen.blocks(like)
        gen.commit(1.0)
        out.append(_flat(w))
    return torch.stack(out).numpy(), starts


def _z(like, seed, offset):
    z = [torch.zeros_like(t) for t in like]
    add_gaussian_noise_(z, 1.0, seed=seed, offset=offset)
    return _flat(z).numpy()


@pytest.mark.parametrize("steps,bands", [(12, 3), (9, 1), (16, 16), (7, 2)])
def test_banded_recursion_is_c_inverse_z(steps, bands):
    s = mf.optimize_banded(steps, bands)
    like = _like()
    W, starts = _run(CorrelatedNoise(s, EVERY), like)
    Z = np.stack([_z(like, 11, o) for o in starts])
    ref = np.linalg.solve(s.matrix(), Z)  # float64 dense C^{-1} z
    np.testing.assert_allclose(W, ref, rtol=0, atol=1e-12)
    assert starts == [i * blocks(like) for i in range(steps)]  # one z per step, contiguous


def test_tree_noise_is_the_noise_matrix_times_node_noises():
    s = mf.tree(13)
    like = _like()
    gen = CorrelatedNoise(s, EVERY)
    per, off, nodes, W = blocks(like), 0, {}, []
    for t in range(s.steps):
        new = sorted(set(s.prefix_nodes(t)) - set(s.prefix_nodes(t - 1)))
        assert gen.blocks(like) == len(new) * per
        for i, n in enumerate(new):
            nodes[n] = _z(like, 5, off + i * per)
        W.append(_flat(gen.draw(like, seed=5, offset=off, secure=False)).numpy())
        off += gen.blocks(like)
        gen.commit(1.0)
        assert len(gen._nodes) == bin(t + 1).count("1")  # the path only: O(log T) vectors
    Zn = np.stack([nodes.get(n, np.zeros(13)) for n in range(s.num_nodes)])
    np.testing.assert_allclose(np.stack(W), s.noise_matrix() @ Zn, rtol=0, atol=1e-12)


def _cov_z(W, M):
    """Per-entry z-scores of the empirical covariance of W's rows (coordinates are iid samples)
    against M M^T: Var(hat S_ij) = (S_ii S_jj + S_ij^2) / P for Gaussian data."""
    P = W.shape[1]
    S = M @ M.T
    hat = W @ W.T / P
    se = np.sqrt((np.outer(np.diag(S), np.diag(S)) + S * S) / P)
    return np.abs(hat - S) / se


@pytest.mark.parametrize("kind", ["banded", "tree"])
def test_noise_covariance_equals_the_factorization(kind):
    steps = 8
    s = mf.optimize_banded(steps, 3) if kind == "banded" else mf.tree(steps)
    like = [torch.zeros(100_000, dtype=torch.float64)]
    W, _ = _run(CorrelatedNoise(s, EVERY), like, seed=2024)
    M = s.noise_matrix()
    iu = np.triu_indices(steps)
    # 36 entries; P(max |z| > 5) < 36 * 5.8e-7 under the null
    assert _cov_z(W, M)[iu].max() < 5.0
    # the test can fail: one coefficient 10% off (expected max z ~13) / a tree row 5% off (~22)
    if kind == "banded":
        C = s.matrix().copy()
        C[1, 0] *= 1.10
        wrong = np.linalg.inv(C)
    else:
        wrong = M.copy()
        wrong[3] *= 1.05
    assert _cov_z(W, wrong)[iu].max() > 5.0


def test_draw_changes_nothing_until_commit():
    s = mf.optimize_banded(6, 3)
    like = _like()
    a, b = CorrelatedNoise(s, EVERY), CorrelatedNoise(s, EVERY)
    a.draw(like, seed=1, offset=0, secure=False)
    a.commit(1.0)
    b.draw(like, seed=1, offset=0, secure=False)
    b.commit(1.0)
    a.draw(like, seed=1, offset=999, secure=False)  # a failed step: drawn, never committed
    a.discard()
    wa = a.draw(like, seed=1, offset=blocks(like), secure=False)
    wb = b.draw(like, seed=1, offset=blocks(like), secure=False)
    assert a.step == b.step == 1 and all(torch.equal(x, y) for x, y in zip(wa, wb))


def test_plan_std_and_shape_are_enforced():
    s = mf.optimize_banded(3, 2)
    gen = CorrelatedNoise(s, EVERY)
    like = _like()
    gen.check_step(0, 2.0)
    gen.draw(like, seed=1, offset=0, secure=False)
    gen.commit(2.0)
    with pytest.raises(PrivacyError, match="constant std"):
        gen.check_step(1, 2.5)
    with pytest.raises(PrivacyError, match="at step 1"):
        gen.check_step(2, 2.0)
    with pytest.raises(ValueError, match="noised parameters changed"):
        gen.draw(_like(8), seed=1, offset=100, secure=False)
    for _ in range(2):
        gen.draw(like, seed=1, offset=100 + gen.step * 10, secure=False)
        gen.commit(2.0)
    with pytest.raises(PrivacyError, match="plan has 3 steps"):
        gen.check_step(3, 2.0)


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        return 1
    if isinstance(obj, dict):
        return sum(_tensors(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensors(v) for v in obj)
    return 0


@pytest.mark.parametrize("kind", ["banded", "tree"])
def test_resume_exact_or_new_segment(kind):
    steps = 10
    s = mf.optimize_banded(steps, 4) if kind == "banded" else mf.tree(steps)
    like = _like()
    W, starts = _run(CorrelatedNoise(s, EVERY), like, seed=3)
    gen = CorrelatedNoise(s, EVERY)
    off = 0
    for _ in range(6):
        gen.draw(like, seed=3, offset=off, secure=False)
        off += gen.blocks(like)
        gen.commit(1.0)
    state = gen.state_dict()
    assert _tensors(state) == 0  # offsets, never noise
    # the same key and nothing released after the save: the same noise sequence, bit for bit
    exact = gen.resumed(state, like=like, seed=3, exact=True)
    for t in range(6, steps):
        w = exact.draw(like, seed=3, offset=starts[t], secure=False)
        exact.commit(1.0)
        assert torch.equal(_flat(w), torch.from_numpy(W[t]))
    # otherwise: a new segment from row 0 of a fresh strategy of the 4 remaining steps
    seg = gen.resumed(state, like=like, seed=99, exact=False)
    assert seg.segment_start == seg.step == 6 and seg._seg.steps == steps - 6
    assert seg.event(6, 1.0) == seg._seg.step_event(0, 1.0, EVERY)
    Wseg, seg_starts = [], []
    for t in range(6, steps):
        seg_starts.append(500 + t * seg.blocks(like))
        Wseg.append(_flat(seg.draw(like, seed=99, offset=seg_starts[-1], secure=False)).numpy())
        seg.commit(1.0)
    fresh, _ = _run(CorrelatedNoise(seg._seg, EVERY), like, seed=99, offset=500 + 6 * blocks(like))
    if kind == "banded":
        np.testing.assert_array_equal(np.stack(Wseg), fresh)
    with pytest.raises(ValueError, match="another noise plan"):
        CorrelatedNoise(mf.optimize_banded(steps, 2), EVERY).check_state(state)
    bad = dict(state, step=steps + 1)
    with pytest.raises(ValueError, match="malformed"):
        gen.check_state(bad)
