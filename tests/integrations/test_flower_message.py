"""ppml_fast on Flower's Message API (issue 18 item 1): FedAvg equal to Flower's, DPFedAvg's maths,
noise, accounting and budget stop, the DP-SGD ClientApp helper (in-process grid); and the same
ServerApp/ClientApp (examples/flower_app) through Flower's simulation and through a deployment
of a SuperLink and two SuperNodes in separate processes (tests/integrations/test_flower_deploy.py)."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

pytest.importorskip("flwr")
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp.exception import PrivacyBudgetExhausted  # noqa: E402
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg  # noqa: E402

from ppml_fast.accounting import GaussianEvent, PLDAccountant, PoissonSampledEvent  # noqa: E402
from ppml_fast.integrations.flower import DPFedAvg, FedAvg, NativeFedAvg, dp_train  # noqa: E402

from ._flower_grid import FunctionGrid, task_identity  # noqa: E402,F401

SHAPES = {"w": (6, 5), "b": (5,), "c": (2, 2, 3), "s": ()}


def record(arrays: dict) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def random_arrays(rng, dtype=np.float32, scale=1.0) -> dict:
    return {k: (scale * rng.standard_normal(s)).astype(dtype) for k, s in SHAPES.items()}


def reply_with(arrays_by_node: dict, weights: dict):
    def reply(node, msg):
        return RecordDict({"arrays": record(arrays_by_node[node]),
                           "metrics": MetricRecord({"num-examples": weights[node], "loss": float(node)})})
    return reply


# -- FedAvg ---------------------------------------------------------------------------------------
def test_legacy_and_message_names_both_import():
    assert NativeFedAvg.__mro__[1].__module__.startswith("flwr.server.strategy")
    assert FedAvg.__mro__[1].__module__.startswith("flwr.serverapp.strategy")
    assert hasattr(FedAvg(), "start") and hasattr(DPFedAvg(noise_multiplier=1, clip_norm=1,
                                                           sampling_rate=0.5, delta=1e-5), "start")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fedavg_equals_flower_fedavg_through_start(task_identity, dtype):
    rng = np.random.default_rng(0)
    clients = {n: random_arrays(rng, dtype) for n in (1, 2, 3)}
    weights = {1: 10, 2: 300, 3: 7}
    init = record(random_arrays(rng, dtype))
    out = {}
    for cls in (FlowerFedAvg, FedAvg):
        grid = FunctionGrid(3, reply_with(clients, weights))
        res = cls(fraction_evaluate=0.0).start(grid=grid, initial_arrays=init, num_rounds=2)
        out[cls] = res
    ours, theirs = out[FedAvg], out[FlowerFedAvg]
    total = sum(weights.values())
    for k in SHAPES:
        ref = sum(weights[n] * clients[n][k].astype(np.float64) for n in clients) / total
        a, b = ours.arrays[k].numpy(), theirs.arrays[k].numpy()
        assert a.dtype == b.dtype == dtype and a.shape == b.shape == SHAPES[k]
        tol = 1e-6 if dtype == np.float32 else 1e-13
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)
        np.testing.assert_allclose(a, ref, rtol=tol, atol=tol)
    assert ours.train_metrics_clientapp[2]["loss"] == pytest.approx(theirs.train_metrics_clientapp[2]["loss"])


def test_fedavg_integer_arrays_average_as_float64(task_identity):
    clients = {1: {"n": np.array([1, 2], np.int64)}, 2: {"n": np.array([2, 5], np.int64)}}
    grid = FunctionGrid(2, reply_with(clients, {1: 1, 2: 3}))
    res = FedAvg(fraction_evaluate=0.0).start(grid=grid, initial_arrays=record(clients[1]), num_rounds=1)
    np.testing.assert_allclose(res.arrays["n"].numpy(), [1.75, 4.25])
    assert res.arrays["n"].numpy().dtype == np.float64


def test_fedavg_refuses_bad_replies(task_identity):
    rng = np.random.default_rng(1)
    a, b = random_arrays(rng), random_arrays(rng)
    strategy = FedAvg(fraction_evaluate=0.0)
    grid = FunctionGrid(2, reply_with({1: a, 2: b}, {1: 0, 2: 0}))
    with pytest.raises(ValueError, match="is 0 for every reply"):
        strategy.start(grid=grid, initial_arrays=record(a), num_rounds=1)
    b2 = dict(b)
    b2["w"] = np.zeros((5, 6), np.float32)  # same keys (Flower checks those), another shape
    grid = FunctionGrid(2, reply_with({1: a, 2: b2}, {1: 1, 2: 1}))
    with pytest.raises(ValueError, match=r"array 'w' has shape \((5, 6|6, 5)\); \d sent shape"):
        strategy.start(grid=grid, initial_arrays=record(a), num_rounds=1)


# -- DPFedAvg -------------------------------------------------------------------------------------
def dp(**kw) -> DPFedAvg:
    args = dict(noise_multiplier=1.0, clip_norm=1.0, sampling_rate=1.0, delta=1e-5, fraction_evaluate=0.0)
    args.update(kw)
    return DPFedAvg(**args)


def flat(arrays: dict) -> np.ndarray:
    return np.concatenate([np.asarray(arrays[k], np.float64).reshape(-1) for k in SHAPES])


def test_dpfedavg_clips_and_uses_the_fixed_denominator(task_identity):
    """σ small: the release is base + sum_k min(1, C/||u_k||) u_k / (qN) (McMahan et al. 2018,
    Alg. 1, f_f), unweighted whatever num-examples say; float64 reference. (σ = 1e-3: the PLD
    accountant overflows at 1e-12; the noise std is then σC/(qN) = 2.5e-4, and 3e-3 is 12 SD.)"""
    rng = np.random.default_rng(2)
    base = random_arrays(rng)
    scales = {1: 0.01, 2: 3.0, 3: 0.2, 4: 5.0}  # updates below and above C = 0.5
    clients = {n: {k: base[k] + s * rng.standard_normal(SHAPES[k]).astype(np.float32)
                   for k in SHAPES} for n, s in scales.items()}
    from flwr.app import Message, MessageType

    # q = 0.5 of N = 4 nodes: the denominator is qN = 2 whatever K is (here all 4 reply)
    strategy = dp(noise_multiplier=1e-3, clip_norm=0.5, sampling_rate=0.5, min_available_nodes=4)
    grid = FunctionGrid(4, reply_with(clients, {1: 1, 2: 1000, 3: 5, 4: 1}))
    strategy.configure_train(1, record(base), ConfigRecord(), grid)
    asked = [Message(content=RecordDict(), message_type=MessageType.TRAIN, dst_node_id=n) for n in clients]
    arrays, _ = strategy.aggregate_train(1, grid.send_and_receive(asked))
    total = np.zeros_like(flat(base))
    for n in clients:
        u = flat(clients[n]) - flat(base)
        total += min(1.0, 0.5 / np.linalg.norm(u)) * u
    ref = flat(base) + total / (0.5 * 4)
    got = flat({k: arrays[k].numpy() for k in SHAPES})
    np.testing.assert_allclose(got, ref, rtol=0, atol=3e-3)
    assert np.abs(got - ref).max() > 0  # the noise is there
    assert arrays["w"].numpy().dtype == np.float32


def test_dpfedavg_noise_std_and_empty_round(task_identity):
    """Std of the release around the base is σC/(qN), whether K nodes replied or none did."""
    big = {"w": np.zeros((200, 200), np.float32)}
    strategy = dp(noise_multiplier=1.5, clip_norm=2.0, sampling_rate=0.25, min_available_nodes=8)
    grid = FunctionGrid(8, lambda n, m: RecordDict({"arrays": record(big),
                                                    "metrics": MetricRecord({"num-examples": 1})}))
    expected = 1.5 * 2.0 / (0.25 * 8)
    for round_ in (1, 2):
        msgs = strategy.configure_train(round_, record(big), ConfigRecord(), grid)
        replies = grid.send_and_receive(msgs) if round_ == 1 else []  # round 2: nobody replied
        arrays, metrics = strategy.aggregate_train(round_, replies)
        x = arrays["w"].numpy().astype(np.float64).ravel()
        # 40,000 samples: the std's relative standard error is 1/sqrt(2*40000) = 0.35%; 2% is ~6 SE
        assert abs(x.std() / expected - 1) < 0.02 and abs(x.mean()) < 6 * expected / 200
        assert metrics["dp-noise-std"] == pytest.approx(expected)
    assert strategy.rounds == 2


def test_dpfedavg_epsilon_per_round_is_the_pld_accountants(task_identity):
    rng = np.random.default_rng(3)
    base = random_arrays(rng)
    strategy = dp(noise_multiplier=1.1, sampling_rate=0.5, min_available_nodes=4)
    grid = FunctionGrid(4, reply_with({n: random_arrays(rng) for n in range(1, 5)}, {n: 1 for n in range(1, 5)}))
    res = strategy.start(grid=grid, initial_arrays=record(base), num_rounds=3)
    event = PoissonSampledEvent(0.5, GaussianEvent(1.1))
    for r in (1, 2, 3):
        ref = PLDAccountant().compose(event, r).get_epsilon(1e-5)
        assert res.train_metrics_clientapp[r]["dp-epsilon"] == pytest.approx(ref, rel=1e-9)
        assert "loss" not in res.train_metrics_clientapp[r]  # client metrics are not noised
    assert all(len(s) <= 4 for s in grid.sent)


def test_dpfedavg_budget_stop(task_identity, caplog):
    rng = np.random.default_rng(4)
    base = random_arrays(rng)
    event = PoissonSampledEvent(1.0, GaussianEvent(2.0))
    eps1, eps2 = (PLDAccountant().compose(event, r).get_epsilon(1e-5) for r in (1, 2))
    strategy = dp(noise_multiplier=2.0, max_epsilon=(eps1 + eps2) / 2)
    grid = FunctionGrid(2, reply_with({1: base, 2: base}, {1: 1, 2: 1}))
    with caplog.at_level(logging.WARNING):
        res = strategy.start(grid=grid, initial_arrays=record(base), num_rounds=5)
    assert sorted(res.train_metrics_clientapp) == [1] and strategy.rounds == 1
    assert "budget stop: running 1 of 5 rounds" in caplog.text
    with pytest.raises(PrivacyBudgetExhausted, match="max_epsilon"):
        strategy.configure_train(2, record(base), ConfigRecord(), grid)
    assert strategy.start(grid=grid, initial_arrays=record(base), num_rounds=3).arrays is not None
    assert strategy.rounds == 1  # nothing more released


def test_dpfedavg_noise_keys(task_identity):
    base = {"w": np.zeros(1000, np.float32)}

    def one_round(strategy, round_=1):
        grid = FunctionGrid(2, lambda n, m: RecordDict({"arrays": record(base),
                                                        "metrics": MetricRecord({"num-examples": 1})}))
        return strategy.aggregate_train(round_, grid.send_and_receive(
            strategy.configure_train(round_, record(base), ConfigRecord(), grid)))[0]["w"].numpy()

    a, b = one_round(dp(seed=7)), one_round(dp(seed=7))
    np.testing.assert_array_equal(a, b)  # a user seed is reproducible ...
    s = dp(seed=7)
    assert s.reproducible_noise and dp().reproducible_noise is None
    r1, r2 = one_round(s, 1), one_round(s, 2)
    assert not np.array_equal(r1, r2)  # ... and rounds never share noise
    assert not np.array_equal(one_round(dp()), one_round(dp()))  # OS-entropy keys differ


@pytest.mark.parametrize("kwargs,match", [
    ({"noise_multiplier": 0}, "noise_multiplier must be a finite number > 0; got 0"),
    ({"clip_norm": -1}, "clip_norm must be a finite number > 0; got -1"),
    ({"sampling_rate": 1.5}, r"sampling_rate must be a finite number in \(0, 1.0\]; got 1.5"),
    ({"delta": 1.0}, r"delta must be in \(0, 1\); got 1.0"),
    ({"accountant": "x"}, "accountant must be one of"),
    ({"seed": -1}, r"seed must be None or an int in \[0, 2\*\*64\); got -1"),
    ({"max_epsilon": math.inf}, "max_epsilon must be a finite number > 0"),
])
def test_dpfedavg_checks_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dp(**kwargs)


# -- DP-SGD in a ClientApp ------------------------------------------------------------------------
def test_dp_train_reports_epsilon_and_keeps_the_accountant_across_rounds(task_identity):
    torch = pytest.importorskip("torch")
    from flwr.app import Message, MessageType

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    model0 = torch.nn.Linear(8, 3)
    arrays = ArrayRecord(model0.state_dict())
    eps = []
    for round_ in (1, 2):
        msg = Message(content=RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": round_})}),
                      message_type=MessageType.TRAIN, dst_node_id=1)
        model = torch.nn.Linear(8, 3)
        reply = dp_train(msg, context, model=model,
                         data_loader=torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16),
                         optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                         noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5)
        m = reply.content["metrics"]
        assert m["num-examples"] == 64 and m["dp-steps"] == 4 and "train_loss" not in m
        eps.append(m["dp-epsilon"])
        arrays = reply.content["arrays"]
        assert list(arrays.keys()) == ["weight", "bias"]
    ref = [PLDAccountant().compose(PoissonSampledEvent(16 / 64, GaussianEvent(1.0)), 4 * r).get_epsilon(1e-5)
           for r in (1, 2)]
    np.testing.assert_allclose(eps, ref, rtol=1e-6)
    assert not np.allclose(arrays["weight"].numpy(), model0.weight.detach().numpy())



def test_dp_train_stops_at_max_epsilon(task_identity):
    torch = pytest.importorskip("torch")
    from flwr.app import Message, MessageType

    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    event = PoissonSampledEvent(16 / 64, GaussianEvent(1.0))
    budget = (PLDAccountant().compose(event, 2).get_epsilon(1e-5)
              + PLDAccountant().compose(event, 3).get_epsilon(1e-5)) / 2  # room for 2 steps
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    model = torch.nn.Linear(8, 3)
    msg = Message(content=RecordDict({"arrays": ArrayRecord(model.state_dict()),
                                      "config": ConfigRecord({"server-round": 1})}),
                  message_type=MessageType.TRAIN, dst_node_id=1)
    reply = dp_train(msg, context, model=model,
                     data_loader=torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16),
                     optimizer=torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0,
                     max_grad_norm=1.0, delta=1e-5, max_epsilon=budget, num_examples=100)
    m = reply.content["metrics"]
    assert m["dp-budget-exhausted"] == 1 and m["dp-steps"] == 2 and m["num-examples"] == 100
    assert m["dp-epsilon"] <= budget

# -- the same ServerApp / ClientApp in Flower's simulation and in a deployment ---------------------
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

APP_DIR = Path(__file__).resolve().parents[2] / "examples" / "flower_app"


def fedavg_reference(rounds: int = 2) -> list[np.ndarray]:
    """The example app's FedAvg rounds in float64 numpy (its two nodes, weights num_examples)."""
    sys.path.insert(0, str(APP_DIR))
    try:
        from ppml_flower_app import task
    finally:
        sys.path.remove(str(APP_DIR))
    arrays = task.initial_arrays()
    for r in range(1, rounds + 1):
        new = [task.train(arrays, *task.load_data(p), server_round=r) for p in (0, 1)]
        w = [task.num_examples(p) for p in (0, 1)]
        arrays = {k: sum(wi * n[k].astype(np.float64) for wi, n in zip(w, new)) / sum(w) for k in task.KEYS}
    return [arrays[k] for k in task.KEYS]


def read_results(out: Path, name: str) -> tuple[list[np.ndarray], dict]:
    with np.load(out / f"{name}.npz") as z:
        arrays = [z[f"arr_{i}"] for i in range(len(z.files) - 1)]
        return arrays, json.loads(str(z["metrics"]))


def env_with_venv(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


SIMULATION = """
import sys
sys.path.insert(0, {app!r})
from flwr.serverapp import ServerApp
from flwr.simulation import run_simulation
from ppml_flower_app import server_app
from ppml_flower_app.client_app import app as client_app

app = ServerApp()

@app.main()
def main(grid, context):
    context.run_config.update({{"strategies": "flower,fedavg,dpfedavg,dpsgd", "out": {out!r}}})
    server_app.main(grid, context)

run_simulation(server_app=app, client_app=client_app, num_supernodes=2,
               backend_config={{"client_resources": {{"num_cpus": 1, "num_gpus": 0.0}},
                               "init_args": {{"num_cpus": 2, "include_dashboard": False}}}})
"""


def test_app_runs_in_flowers_simulation(tmp_path):
    """Flower 1.42's simulation has one backend, Ray (no in-process backend): ~40 s here."""
    pytest.importorskip("ray")
    script = tmp_path / "sim.py"
    script.write_text(SIMULATION.format(app=str(APP_DIR), out=str(tmp_path)))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env_with_venv(),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ours, _ = read_results(tmp_path, "fedavg")
    theirs, _ = read_results(tmp_path, "flower")
    for a, b, ref in zip(ours, theirs, fedavg_reference()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)  # ppml_fast's FedAvg == Flower's
        np.testing.assert_allclose(a, ref, rtol=1e-5, atol=1e-6)
    _, dp_metrics = read_results(tmp_path, "dpfedavg")
    event = PoissonSampledEvent(1.0, GaussianEvent(1.0))
    for r in (1, 2):
        ref = PLDAccountant().compose(event, r).get_epsilon(1e-5)
        assert dp_metrics[str(r)]["dp-epsilon"] == pytest.approx(ref, rel=1e-9)
    _, sgd_metrics = read_results(tmp_path, "dpsgd")
    assert 0 < sgd_metrics["1"]["dp-epsilon"] < sgd_metrics["2"]["dp-epsilon"] < math.inf


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")


@pytest.fixture
def local_federation(tmp_path):
    """A SuperLink and two SuperNodes (partition 0 and 1) on localhost, insecure, each its own
    process (group); killed by id when the test ends. Yields (FLWR_HOME, connection name)."""
    home = tmp_path / "flwr_home"
    home.mkdir()
    link = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "local-test"\n\n[superlink.local-test]\n'
        f'address = "127.0.0.1:{link}"\ninsecure = true\n')
    env = env_with_venv(FLWR_HOME=str(home))
    procs = []

    def start(*args: str, log: str) -> subprocess.Popen:
        p = subprocess.Popen(list(args), env=env, cwd=tmp_path, start_new_session=True,
                             stdout=open(tmp_path / log, "w"), stderr=subprocess.STDOUT)
        procs.append(p)
        return p

    try:
        superlink = start("flower-superlink", "--insecure", "--port", str(link),
                          "--disable-runtime-dependency-installation", log="superlink.log")
        wait_for_port(link, superlink)
        for pid in (0, 1):
            start("flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}",
                  "--port", str(free_port()), "--node-config", f"partition-id={pid} num-partitions=2",
                  log=f"supernode{pid}.log")
        yield home, "local-test", env
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def test_app_runs_on_a_superlink_and_two_supernodes(tmp_path, local_federation):
    """`flwr run` submits the example app to a local SuperLink; the ServerApp (its own
    flwr-serverapp process) runs ppml_fast's FedAvg for 2 rounds through two SuperNodes (each
    message handled by a flwr-clientapp process) and writes its final arrays."""
    home, connection, env = local_federation
    app = tmp_path / "app"
    shutil.copytree(APP_DIR, app, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "out"
    out.mkdir()
    cmd = ["flwr", "run", str(app), connection, "--stream",
           "--run-config", f"strategies='fedavg' num-server-rounds=2 out='{out}'"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    logs = "".join((tmp_path / f).read_text()[-2000:] for f in ("superlink.log", "supernode0.log"))
    assert proc.returncode == 0 and (out / "fedavg.npz").exists(), \
        proc.stdout[-4000:] + proc.stderr[-2000:] + logs
    assert "[ROUND 2/2]" in proc.stdout
    arrays, metrics = read_results(out, "fedavg")
    for a, ref in zip(arrays, fedavg_reference()):
        np.testing.assert_allclose(a, ref, rtol=1e-5, atol=1e-6)
    assert metrics["2"]["node-partition"] == pytest.approx((0 * 64 + 1 * 80) / 144)
