"""Issue 15, item 5 (and the key rules of item 1): noise streams never repeat across threads or
forks. A seeded NoiseSource shared by 4 threads repeated noise in 425-654 of 1,200 releases (the
offset was read, used, then written back); NoiseSource() and DPOptimizer(noise_seed=None) made
before a fork() drew identical noise in parent and child.

The fork tests run in a fresh interpreter (subprocess) that forks with os.fork and reports
through a pipe, so pytest's own process never forks with threads running.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

from ppml_fast.mechanisms import NoiseSource
from ppml_fast.noise_keys import (
    OFFSET_LIMIT,
    REPRODUCIBLE_NOISE,
    NoiseStream,
    derived_key,
    noise_seed,
)


def _hammer(source: NoiseSource, threads: int = 4, per_thread: int = 300, size: int = 16):
    rows: list[tuple] = []
    lock = threading.Lock()
    start = threading.Barrier(threads)

    def work():
        start.wait()
        mine = [tuple(source.normal((size,)).tolist()) for _ in range(per_thread)]
        with lock:
            rows.extend(mine)

    ts = [threading.Thread(target=work) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return rows


@pytest.mark.parametrize("seed", [3, None])
def test_four_threads_sharing_a_source_never_repeat_noise(seed):
    torch.set_num_threads(1)
    source = NoiseSource(seed)
    rows = _hammer(source)
    assert len(rows) == 1200
    assert len(set(rows)) == 1200, f"{1200 - len(set(rows))} releases repeated noise"
    assert source.offset == 1200 * 8  # every reserved range used once, none skipped


def test_stream_reservations_are_disjoint_under_threads():
    stream = NoiseStream(1)
    got: list[int] = []
    lock = threading.Lock()

    def work():
        mine = [stream.reserve(3)[1] for _ in range(2000)]
        with lock:
            got.extend(mine)

    ts = [threading.Thread(target=work) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert sorted(got) == list(range(0, 3 * 8000, 3))


def test_a_stream_refuses_to_pass_its_offset_limit():
    stream = NoiseStream(1)
    stream.advance_to(OFFSET_LIMIT - 2)
    with pytest.raises(ValueError, match="wrap"):
        stream.reserve(3)
    assert stream.offset == OFFSET_LIMIT - 2  # unchanged by the refused reservation
    assert stream.reserve(2) == (1, OFFSET_LIMIT - 2)


def test_keys_come_from_os_entropy_unless_a_seed_is_given():
    assert NoiseSource().seed != NoiseSource().seed
    assert not NoiseSource().reproducible
    assert NoiseSource(9).seed == 9 and NoiseSource(9).reproducible
    assert noise_seed("s", None, secure=True) is None
    for bad in (-1, 2**64, 1.5, True):
        with pytest.raises(ValueError, match="s must be None or an int"):
            noise_seed("s", bad)
    with pytest.raises(ValueError, match="secure mode"):
        noise_seed("s", 3, secure=True)
    assert "no privacy" in REPRODUCIBLE_NOISE


_FORK_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    torch.set_num_threads(1)
    from torch import nn
    from ppml_fast.mechanisms import NoiseSource
    from ppml_fast.privacy import DPOptimizer, PrivateModule
    from ppml_fast.federated import DPFedAvgFixed, FedAvg

    def in_child(fn):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                os.close(r)
                os.write(w, json.dumps(fn()).encode())
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        os.close(w)
        data = b""
        while True:
            chunk = os.read(r, 65536)
            if not chunk:
                break
            data += chunk
        _, status = os.waitpid(pid, 0)
        assert status == 0, "child failed"
        return json.loads(data)

    def optimizer(seed):
        pm = PrivateModule(nn.Linear(3, 1))
        return DPOptimizer(torch.optim.SGD(pm.parameters(), lr=0.1), module=pm,
                           noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4.0,
                           seed=seed)

    out = {}
    for name, seed in (("unseeded", None), ("seeded", 5)):
        src = NoiseSource(seed)
        src.normal((4,))
        child = in_child(lambda: src.normal((6,)).tolist())
        child2 = in_child(lambda: src.normal((6,)).tolist())
        out[name] = {"parent": src.normal((6,)).tolist(), "child": child, "child2": child2}
        opt = optimizer(seed)
        out[name]["opt"] = [opt.seed, in_child(lambda: opt.seed)]
        strat = DPFedAvgFixed(FedAvg(), noise_multiplier=1.0, clip_norm=1.0, seed=seed)
        out[name]["fedavg"] = [strat.seed, in_child(lambda: strat.seed)]
    print(json.dumps(out))
""")


def _fork_run() -> dict:
    proc = subprocess.run([sys.executable, "-c", _FORK_SCRIPT], capture_output=True, text=True,
                          timeout=240, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_forked_children_draw_noise_of_their_own():
    first = _fork_run()
    for name in ("unseeded", "seeded"):
        r = first[name]
        assert r["parent"] != r["child"], f"{name}: child repeated the parent's noise"
        assert r["child"] != r["child2"], f"{name}: two children drew the same noise"
        assert r["opt"][0] != r["opt"][1], f"{name}: DPOptimizer kept its key in the child"
        assert r["fedavg"][0] != r["fedavg"][1], f"{name}: DPFedAvgFixed kept its key in the child"
    # seeded streams are re-keyed deterministically (SHA-256 of key and fork number): the run
    # stays reproducible; unseeded ones are re-keyed from OS entropy
    second = _fork_run()
    assert second["seeded"]["child"] == first["seeded"]["child"]
    assert second["seeded"]["parent"] == first["seeded"]["parent"]
    assert second["seeded"]["opt"] == first["seeded"]["opt"]
    assert second["unseeded"]["child"] != first["unseeded"]["child"]


def test_derived_keys_differ_by_fork_number_and_key():
    keys = {derived_key(k, n) for k in range(50) for n in range(1, 50)}
    assert len(keys) == 50 * 49


def test_copies_of_an_unseeded_stream_draw_their_own_noise():
    import copy
    import pickle

    src = NoiseSource()
    src.normal((3,))
    clones = [copy.deepcopy(src), pickle.loads(pickle.dumps(src))]
    for clone in clones:
        assert clone.offset == src.offset and clone.seed != src.seed
    mine = src.normal((8,))
    for clone in clones:
        assert not torch.equal(clone.normal((8,)), mine)
    seeded = NoiseSource(4)
    seeded.normal((3,))
    clone = pickle.loads(pickle.dumps(seeded))  # a checkpoint resumes the same stream
    assert (clone.seed, clone.offset) == (4, seeded.offset)
    assert torch.equal(clone.normal((5,)), seeded.normal((5,)))
