"""The double-masking protocol (Bonawitz et al. 2017, section 4; SecAgg+ graphs of Bell et al.
2020): what the server sees of one client is uniform on Z_{2^32} (chi-square), the unmasked sum
equals the plain sum within the stated quantisation bound (exactly, for inputs on the grid),
dropouts below the threshold are recovered and above it fail with SecAggError, clients refuse
to reveal both secrets of one client, and bad arguments raise."""

from __future__ import annotations

import importlib
import random
import sys

import numpy as np
import pytest
import torch
from scipy import stats

from ppml_fast.federated.secagg import (SecAggClient, SecAggError, SecAggParams, SecAggRound,
                                        SecAggServer, UnmaskResponse, default_threshold, secure_sum)


def _rand(seed: int):
    return random.Random(seed).randbytes


def _updates(k: int, p: int, seed: int, scale: float = 0.5) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p, generator=gen) * scale for _ in range(k)]


def _grid_updates(params: SecAggParams, k: int, seed: int) -> list[torch.Tensor]:
    """Inputs exactly on the encoding's grid (scale a power of two): rounding is deterministic and
    the decoded sum exact, so recovery can be checked for equality."""
    q = params.quantizer
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, q.levels + 1, (k, params.vector_length), generator=gen, dtype=torch.int64)
    return list(codes.to(torch.float64) / q.scale - q.clip_range)


def _grid_params(k: int, p: int, **kw) -> SecAggParams:
    # bits 16, r = 65535 / 2^11: scale = 2^10, every grid value and partial sum exact in float64
    return SecAggParams.create(list(range(k)), vector_length=p, clip_range=65535 / 2048, bits=16, **kw)


def _masked_vector(seed: int, update: torch.Tensor) -> torch.Tensor:
    """Client 0's masked input in a 3-client round (what the server receives from it)."""
    params = SecAggParams.create([0, 1, 2], vector_length=update.numel(), clip_range=1.0, threshold=2)
    rb = _rand(seed)
    clients = [SecAggClient(c, params, randbytes=rb) for c in params.clients]
    server = SecAggServer(params)
    routed = server.collect_keys({c.cid: c.advertise_keys() for c in clients})
    inbox = server.route_shares({c.cid: c.share_keys(routed[c.cid]) for c in clients})
    return clients[0].masked_input(update, inbox[0])


def _chi2_pvalue(values: np.ndarray, bins: int) -> float:
    counts = np.bincount(values, minlength=bins)
    return float(stats.chisquare(counts).pvalue)


def test_server_view_of_one_client_is_uniform():
    p = (1 << 16) - 1  # masked vectors of 2^16 words
    y = _masked_vector(0, torch.zeros(p)).numpy().view(np.uint32)
    # bytes: 2^18 draws in 256 bins; top bytes of the words: 2^16 draws in 256 bins. A p-value
    # below 1e-3 would reject uniformity (fixed seed: the test is deterministic).
    assert _chi2_pvalue(y.view(np.uint8), 256) > 1e-3
    assert _chi2_pvalue((y >> 24).astype(np.int64), 256) > 1e-3
    # the test has power: the unmasked encoding of the same input is far from uniform
    codes = torch.zeros(p + 1, dtype=torch.int64)
    assert _chi2_pvalue((codes.numpy() >> 24), 256) < 1e-10
    # and a constant input does not show through: two clients' views are unrelated
    y2 = _masked_vector(1, torch.zeros(p)).numpy().view(np.uint32)
    assert np.mean(y == y2) < 1e-3


@pytest.mark.parametrize("neighbours", [None, 4])
def test_unmasked_sum_within_quantisation_bound(neighbours):
    k, p = 9, 3001
    ups = _updates(k, p, seed=1)
    res = secure_sum(ups, clip_range=3.0, neighbours=neighbours,
                     threshold=None if neighbours is None else 3, randbytes=_rand(2))
    plain = torch.stack(ups).double().sum(0)
    assert res.survivors == tuple(range(k)) and res.dropped == () and res.weight_sum == k
    assert res.error_bound == pytest.approx(k * 6.0 / (2 ** 28 - 1))
    assert float((res.total - plain).abs().max()) < res.error_bound
    assert torch.allclose(res.mean(), plain / k, atol=res.error_bound / k, rtol=0)


def test_weighted_sum():
    k, p = 5, 257
    ups = _updates(k, p, seed=3)
    weights = [3, 0, 10, 7, 1]
    res = secure_sum(ups, clip_range=2.5, weights=weights, max_weight=10, randbytes=_rand(4))
    plain = sum(w * u.double() for w, u in zip(weights, ups))
    assert res.weight_sum == 21
    assert float((res.total - plain).abs().max()) < res.error_bound


@pytest.mark.parametrize("neighbours, threshold, drops", [
    (None, 5, {"drop_before_masking": [1, 6]}),
    (None, 5, {"drop_before_sharing": [0], "drop_before_masking": [3]}),
    (None, 5, {"drop_before_masking": [2], "drop_before_unmasking": [4]}),
    (4, 3, {"drop_before_masking": [5]}),
])
def test_dropouts_below_threshold_recover_exactly(neighbours, threshold, drops):
    k, p = 7, 101
    params = _grid_params(k, p, threshold=threshold, neighbours=neighbours, randbytes=_rand(5))
    ups = _grid_updates(params, k, seed=6)
    res = SecAggRound(params, randbytes=_rand(7)).run(ups, **drops)
    gone = set(drops.get("drop_before_sharing", [])) | set(drops.get("drop_before_masking", []))
    alive = [c for c in range(k) if c not in gone]
    assert res.survivors == tuple(alive)
    assert set(res.dropped) == set(drops.get("drop_before_masking", []))
    assert torch.equal(res.total, torch.stack([ups[c] for c in alive]).sum(0))
    assert res.weight_sum == len(alive)


@pytest.mark.parametrize("drops, match", [
    ({"drop_before_masking": [0, 1, 2]}, "masked inputs sent by 4 of 7 clients, below the threshold t=5"),
    ({"drop_before_sharing": [0, 1], "drop_before_masking": [2]}, "masked inputs sent by 4"),
    ({"drop_before_unmasking": [0, 1, 2]}, "unmasking responses from 4 of 7 clients"),
])
def test_dropouts_above_threshold_fail_clearly(drops, match):
    params = _grid_params(7, 33, threshold=5)
    with pytest.raises(SecAggError, match=match):
        SecAggRound(params, randbytes=_rand(8)).run(_grid_updates(params, 7, seed=9), **drops)


def test_secagg_plus_fails_when_a_neighbourhood_is_short():
    # k = 4: each client's shares are held by its 4 neighbours and itself (t = 4 of 5); dropping
    # two neighbours of one survivor leaves 3 holders of its self-mask seed
    params = _grid_params(10, 17, threshold=4, neighbours=4, randbytes=_rand(10))
    u = 0
    near = sorted(params.graph[u])[:2]
    with pytest.raises(SecAggError, match=f"shares of the self-mask seed {u} arrived"):
        SecAggRound(params, randbytes=_rand(11)).run(_grid_updates(params, 10, seed=12),
                                                     drop_before_unmasking=near)


def test_client_never_reveals_both_secrets():
    params = _grid_params(4, 8, threshold=3)
    rb = _rand(13)
    clients = [SecAggClient(c, params, randbytes=rb) for c in params.clients]
    server = SecAggServer(params)
    routed = server.collect_keys({c.cid: c.advertise_keys() for c in clients})
    inbox = server.route_shares({c.cid: c.share_keys(routed[c.cid]) for c in clients})
    ups = _grid_updates(params, 4, seed=14)
    for c in clients[:3]:
        server.add_masked_input(c.cid, c.masked_input(ups[c.cid], inbox[c.cid]))
    first = clients[0].unmask([0, 1, 2])
    assert set(first.mask_shares) == {0, 1, 2} and set(first.key_shares) == {3}
    # a server claiming another set of survivors would get s_sk of a client whose b it holds
    with pytest.raises(SecAggError, match="out of order"):
        clients[0].unmask([0, 1, 2, 3])
    with pytest.raises(SecAggError, match="both kinds of shares"):
        UnmaskResponse(mask_shares={1: b"x"}, key_shares={1: b"y"})


def test_tampered_share_message_is_refused():
    params = _grid_params(3, 8, threshold=2)
    rb = _rand(15)
    clients = [SecAggClient(c, params, randbytes=rb) for c in params.clients]
    server = SecAggServer(params)
    routed = server.collect_keys({c.cid: c.advertise_keys() for c in clients})
    inbox = server.route_shares({c.cid: c.share_keys(routed[c.cid]) for c in clients})
    ct = bytearray(inbox[0][1])
    ct[20] ^= 1
    inbox[0][1] = bytes(ct)
    clients[0].masked_input(torch.zeros(8), inbox[0])
    with pytest.raises(SecAggError, match="share message from client 1 fails authentication"):
        clients[0].unmask([0, 1, 2])


def test_server_rejects_unexpected_masked_inputs():
    params = _grid_params(3, 4, threshold=2)
    rb = _rand(16)
    clients = [SecAggClient(c, params, randbytes=rb) for c in params.clients]
    server = SecAggServer(params)
    routed = server.collect_keys({c.cid: c.advertise_keys() for c in clients})
    inbox = server.route_shares({c.cid: c.share_keys(routed[c.cid]) for c in clients[:2]})
    y = clients[0].masked_input(torch.zeros(4), inbox[0])
    server.add_masked_input(0, y)
    with pytest.raises(SecAggError, match="a second masked input from client 0"):
        server.add_masked_input(0, y)
    with pytest.raises(SecAggError, match="masked input from 2, which did not share keys"):
        server.add_masked_input(2, y)
    with pytest.raises(ValueError, match=r"must be an int32 tensor of shape \(5,\)"):
        server.add_masked_input(1, torch.zeros(5))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(clients=[0]), ValueError, "at least 2 ids"),
    (dict(clients=[0, 0, 1]), ValueError, "clients must be distinct"),
    (dict(threshold=2), ValueError, r"threshold must be in \(2.5, 5\]"),
    (dict(threshold=6), ValueError, r"threshold must be in \(2.5, 5\]"),
    (dict(neighbours=3), ValueError, "neighbours must be an even int >= 2"),
    (dict(bits=30), ValueError, r"bits must be in \[1, 29\]"),
    (dict(max_weight=2**30), ValueError, "max_weight must be < 2\\^32 / 5 clients"),
    (dict(vector_length=0), ValueError, "vector_length must be in"),
    (dict(clip_range=-1.0), ValueError, "clip_range must be a finite number > 0"),
])
def test_bad_parameters(kwargs, error, match):
    args = dict(clients=list(range(5)), vector_length=4, clip_range=1.0)
    args.update(kwargs)
    clients = args.pop("clients")
    with pytest.raises(error, match=match):
        SecAggParams.create(clients, **args)


def test_bad_run_arguments():
    params = _grid_params(3, 4, threshold=2)
    rnd = SecAggRound(params, randbytes=_rand(17))
    with pytest.raises(ValueError, match=r"inputs lacks the vectors of clients \[2\]"):
        rnd.run({0: torch.zeros(4), 1: torch.zeros(4)})
    with pytest.raises(ValueError, match=r"drop_before_masking names clients \[7\]"):
        rnd.run([torch.zeros(4)] * 3, drop_before_masking=[7])
    with pytest.raises(ValueError, match=r"weight must be an int in \[0, max_weight=1\]"):
        SecAggRound(params, randbytes=_rand(18)).run([torch.zeros(4)] * 3, weights={0: 2})
    with pytest.raises(ValueError, match="update must have vector_length=4 elements"):
        SecAggRound(params, randbytes=_rand(19)).run([torch.zeros(5)] * 3)


def test_default_threshold_is_above_two_thirds():
    for h in range(2, 200):
        t = default_threshold(h)
        assert 2 * h / 3 < t <= h and t > h / 2


def test_missing_cryptography_names_the_extra(monkeypatch):
    for name in [m for m in sys.modules if m == "cryptography" or m.startswith("cryptography.")]:
        monkeypatch.setitem(sys.modules, name, None)
    params = _grid_params(3, 4, threshold=2)
    with pytest.raises(ImportError, match=r"pip install 'ppml_fast\[secagg\]'"):
        SecAggClient(0, params)


def test_module_imports_without_cryptography(monkeypatch):
    for name in [m for m in sys.modules if m == "cryptography" or m.startswith("cryptography.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "cryptography", None)
    for name in [m for m in sys.modules if m.startswith("ppml_fast.federated.secagg")]:
        monkeypatch.delitem(sys.modules, name)  # restored after the test
    parent = sys.modules["ppml_fast.federated"]
    monkeypatch.setattr(parent, "secagg", parent.secagg)  # the import rebinds it; restored too
    fresh = importlib.import_module("ppml_fast.federated.secagg")
    assert fresh.SecAggRound.__name__ == "SecAggRound"
