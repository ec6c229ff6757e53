"""The layer packing behind NativeFedAvg (no Flower needed), and the adapter's import guard."""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest

from ppml_fast.integrations._ndarrays import aggregate_ndarrays, check_layout, pack, unpack


def _clients(rng, k, shapes, dtypes):
    return [[rng.standard_normal(s).astype(d) for s, d in zip(shapes, dtypes)] for _ in range(k)]


def test_pack_unpack_round_trip_keeps_shapes_and_dtypes():
    rng = np.random.default_rng(0)
    layers = _clients(rng, 1, [(2, 3), (), (4,), (1, 1, 2)], [np.float32, np.float64, np.float16,
                                                            np.float32])[0]
    flat = pack(layers, np.dtype(np.float64))
    assert flat.shape == (6 + 1 + 4 + 2,) and flat.dtype == np.float64
    back = unpack(flat, layers)
    for a, b in zip(back, layers):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def test_weighted_mean_per_layer_in_float64():
    rng = np.random.default_rng(1)
    shapes = [(5, 4), (4,), ()]
    clients = _clients(rng, 6, shapes, [np.float64] * 3)
    w = rng.uniform(0.5, 5.0, size=6)
    out = aggregate_ndarrays(clients, w)
    for j in range(3):
        expected = sum(w[k] * clients[k][j] for k in range(6)) / w.sum()
        np.testing.assert_allclose(out[j], expected, rtol=1e-12, atol=1e-13)


def test_mixed_dtypes_pack_in_the_common_type_and_come_back_in_their_own():
    rng = np.random.default_rng(2)
    clients = _clients(rng, 3, [(3,), (2, 2)], [np.float32, np.float64])
    clients[0].append(np.arange(3))
    clients[1].append(np.arange(3) * 2)
    clients[2].append(np.arange(3) * 3)
    out = aggregate_ndarrays(clients, [1, 1, 2])
    assert [a.dtype for a in out] == [np.float32, np.float64, np.float64]
    np.testing.assert_allclose(out[2], np.arange(3) * (1 + 2 + 6) / 4)


def test_reference_clips_updates_over_all_layers_together():
    rng = np.random.default_rng(3)
    shapes = [(10,), (3, 3)]
    ref = _clients(rng, 1, shapes, [np.float64] * 2)[0]
    clients = [[r + 5.0 * u for r, u in zip(ref, c)] for c in _clients(rng, 4, shapes, [np.float64] * 2)]
    out = aggregate_ndarrays(clients, [1, 1, 1, 1], reference=ref, clip_norm=1.0)
    delta = np.concatenate([(o - r).ravel() for o, r in zip(out, ref)])
    assert np.linalg.norm(delta) <= 1.0 + 1e-12
    ups = [np.concatenate([(c - r).ravel() for c, r in zip(cl, ref)]) for cl in clients]
    np.testing.assert_allclose(delta, sum(u / np.linalg.norm(u) for u in ups) / 4, rtol=1e-12)


def test_empty_models_and_bad_layouts():
    assert aggregate_ndarrays([[], []], [1, 2]) == []
    with pytest.raises(ValueError, match="clients must not be empty"):
        check_layout([])
    a = [np.zeros((2, 2)), np.zeros(3)]
    with pytest.raises(ValueError, match=r"clients\[1\] has 1 layers; clients\[0\] has 2"):
        aggregate_ndarrays([a, a[:1]], [1, 1])
    with pytest.raises(ValueError, match=r"clients\[1\] layer 1 has shape \(4,\)"):
        aggregate_ndarrays([a, [a[0], np.zeros(4)]], [1, 1])
    with pytest.raises(ValueError, match="reference"):
        aggregate_ndarrays([a, a], [1, 1], reference=[np.zeros((2, 2))])
    with pytest.raises(ValueError, match="weights must be >= 0"):
        aggregate_ndarrays([a, a], [1, -1])


def _block_flwr(monkeypatch):
    """Makes every ``import flwr...`` fail, as on a machine without Flower."""
    for name in [n for n in sys.modules if n == "flwr" or n.startswith("flwr.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "flwr", None)
    monkeypatch.delitem(sys.modules, "ppml_fast.integrations.flower", raising=False)


def test_flower_adapter_without_flwr_names_the_extra(monkeypatch):
    _block_flwr(monkeypatch)
    with pytest.raises(ImportError, match=r"pip install 'ppml_fast\[flower\]'"):
        importlib.import_module("ppml_fast.integrations.flower")
    # the package and the Opacus adapter import without Flower (and without Opacus)
    monkeypatch.setitem(sys.modules, "opacus", None)
    for name in ("ppml_fast.integrations", "ppml_fast.integrations.opacus"):
        monkeypatch.delitem(sys.modules, name, raising=False)
        importlib.import_module(name)
