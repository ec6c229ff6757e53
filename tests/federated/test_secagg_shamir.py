"""Shamir sharing over GF(2^521 - 1): any t shares reconstruct, t - 1 do not, corrupted
shares are detected for 32-byte secrets, and argument errors."""

from __future__ import annotations

import itertools
import random

import pytest

from ppml_fast.federated.secagg import SecAggError, shamir


def test_any_t_shares_reconstruct_and_fewer_do_not():
    rb = random.Random(0).randbytes
    secret = int.from_bytes(rb(32), "big")
    xs = [1, 2, 5, 9, 10]
    shares = shamir.split(secret, 3, xs, rb)
    for subset in itertools.combinations(xs, 3):
        assert shamir.reconstruct({x: shares[x] for x in subset}, 3) == secret
    # t - 1 shares interpolated as if the threshold were t - 1 give an unrelated value
    assert shamir.reconstruct({x: shares[x] for x in xs[:2]}, 2) != secret
    with pytest.raises(SecAggError, match="2 shares cannot reconstruct a secret shared with threshold 3"):
        shamir.reconstruct({x: shares[x] for x in xs[:2]}, 3)


def test_bytes_round_trip_and_corruption_detected():
    rb = random.Random(1).randbytes
    secret = rb(32)
    shares = shamir.split_bytes(secret, 4, range(1, 8), rb)
    assert all(len(s) == shamir.SHARE_BYTES for s in shares.values())
    assert shamir.reconstruct_bytes({x: shares[x] for x in (2, 3, 5, 7)}, 4) == secret
    bad = dict(shares)
    # a share replaced by a random field element: the result is uniform in the field, so above
    # 2^256 but with probability 2^-265 (a small offset would go unnoticed: no check without
    # commitments; the protocol checks reconstructed keys against their public keys)
    bad[2] = (int.from_bytes(rb(64), "big") % shamir.PRIME).to_bytes(shamir.SHARE_BYTES, "big")
    with pytest.raises(SecAggError, match="inconsistent"):
        shamir.reconstruct_bytes({x: bad[x] for x in (2, 3, 5, 7)}, 4)


@pytest.mark.parametrize("threshold, xs, secret, match", [
    (0, [1, 2], 5, r"threshold must be in \[1, 2\]"),
    (3, [1, 2], 5, r"threshold must be in \[1, 2\]"),
    (2, [1, 1, 2], 5, "share points must be distinct"),
    (2, [0, 1], 5, "share points must be in"),
    (2, [1, 2], shamir.PRIME, "secret must be in"),
])
def test_bad_arguments(threshold, xs, secret, match):
    with pytest.raises(ValueError, match=match):
        shamir.split(secret, threshold, xs, random.Random(0).randbytes)
