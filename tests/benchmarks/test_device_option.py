"""The benchmarks' device option (``device=``, ``$PPML_BENCH_DEVICE``, ``ppml-fast bench
--device``): choosing and checking the device, the op cases moved to a GPU, the CUDA peak-memory
table; and, on a machine with a GPU and the CUDA kernels, the tiny DP-step cases on CUDA."""

from __future__ import annotations

import math

import pytest
import torch

from ppml_fast.benchmarks import device, dp_step, ops
from ppml_fast.cli import main
from ppml_fast.ops import cuda_available

HAS_CUDA = torch.cuda.is_available() and cuda_available()


def test_device_defaults_to_cpu_and_the_environment_chooses_otherwise(monkeypatch):
    monkeypatch.delenv(device.DEVICE_ENV, raising=False)
    assert device.bench_device() == "cpu"
    monkeypatch.setenv(device.DEVICE_ENV, "cpu")
    assert device.bench_device() == "cpu"
    monkeypatch.setenv(device.DEVICE_ENV, "gpu")
    with pytest.raises(ValueError, match="PPML_BENCH_DEVICE must be one of 'cpu', 'cuda'; "
                                         "got 'gpu'"):
        device.bench_device()
    assert device.bench_device("cpu") == "cpu"  # the argument wins over the environment
    with pytest.raises(ValueError, match="device must be one of"):
        device.bench_device("tpu")


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a machine without CUDA")
def test_cuda_without_a_gpu_or_kernels_is_refused(monkeypatch, capsys):
    monkeypatch.delenv(device.DEVICE_ENV, raising=False)
    with pytest.raises(ValueError, match="device is 'cuda' but"):
        dp_step.dp_step_cases("tiny", device="cuda")
    with pytest.raises(ValueError, match="device is 'cuda' but"):
        ops.op_cases("tiny", device="cuda")
    assert main(["bench", "--sizes", "tiny", "--only", "dp-step", "--device", "cuda"]) == 2
    assert "device is 'cuda' but" in capsys.readouterr().err
    assert dp_step.main(["--memory", "--sizes", "tiny", "--device", "cuda"]) == 2


def test_cpu_cases_are_unchanged_by_the_option(monkeypatch):
    monkeypatch.delenv(device.DEVICE_ENV, raising=False)
    for make in (dp_step.dp_step_cases, ops.op_cases):
        default, cpu = make("tiny"), make("tiny", device="cpu")
        assert [(c.key, c.name) for c in default] == [(c.key, c.name) for c in cpu]
        assert not any("[cuda]" in c.name for c in cpu)
    inputs = dp_step.dp_step_cases("tiny", "cpu")[0].setup()
    assert inputs["device"] == "cpu" and inputs["x"].device.type == "cpu"


def test_op_cases_on_cuda_leave_out_the_numpy_rows():
    # on_device builds the GPU case without touching a GPU (inputs move only in setup)
    case = ops.aggregate_case(10, 1000)
    assert ops.on_device(case, "cpu") is case
    gpu = ops.on_device(case, "cuda")
    keys = [i.key for i in gpu.impls]
    assert gpu.key == case.key and gpu.name == f"{case.name} [cuda]"
    assert "flower" not in keys and "ppml_numpy" not in keys
    assert keys == [i.key for i in case.impls if i.key not in ops.CPU_ONLY]
    for impl in gpu.impls:  # every baseline still has its ppml_fast reference
        assert gpu.reference(impl) is None or gpu.reference(impl).key in keys


def test_peak_memory_table_names_what_it_measured():
    cuda_row = {"case": "c", "impl": "i", "memory": "cuda", "before_mb": 10.0, "peak_mb": 14.5,
                "growth_mb": 4.5, "error": None}
    table = dp_step.format_peak_memory([cuda_row, {"case": "c", "impl": "j", "error": "boom"}])
    assert "peak CUDA growth MiB" in table and "max_memory_allocated" in table
    assert "4.5" in table and "failed: j at c: boom" in table
    rss_row = {"case": "c", "impl": "k", "rss_before_mb": 300.0, "peak_mb": 310.0,
               "growth_mb": 10.0, "error": None}  # rows from before the "memory" field
    assert "peak RSS growth MiB" in dp_step.format_peak_memory([rss_row])


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a build of ppml_fast with the "
                    "CUDA kernels")
@pytest.mark.parametrize("key", ["dp-step-mlp", "dp-step-cnn", "dp-step-text"])
def test_tiny_dp_step_cases_run_on_cuda_with_their_peak_memory(key):
    case = next(c for c in dp_step.dp_step_cases("tiny", device="cuda") if c.key == key)
    assert case.name.endswith("[cuda]")
    inputs = case.setup()
    assert inputs["x"].device.type == "cuda"
    impls = {i.key: i for i in case.impls}
    losses = {}
    for k in ("ppml_ghost", "ppml_materialize", "nonprivate"):
        fn = impls[k].make(inputs)
        losses[k] = [float(fn()) for _ in range(2)]
        assert all(math.isfinite(v) for v in losses[k]), (k, losses[k])
    assert losses["ppml_ghost"] == pytest.approx(losses["ppml_materialize"], rel=1e-4)
    mem = dp_step.peak_memory(key, "ppml_ghost", "tiny", steps=2, device="cuda")
    assert mem["error"] is None and mem["memory"] == "cuda"
    assert mem["peak_mb"] >= mem["before_mb"] > 0 and mem["growth_mb"] > 0
