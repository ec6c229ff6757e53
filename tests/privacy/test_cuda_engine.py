"""The DP step on CUDA against the same step on the CPU: ``PrivacyEngine`` on an MLP, a small CNN
(with GroupNorm) and a text model with ``nn.TransformerEncoderLayer``.

What must hold, and why:
- the noise is bit-identical across devices for the same seed and offset (Philox keyed by the
  seed, counter = offset + element index, computed in double; ``csrc/include/ppml/gaussian.h``),
  so a step whose clipped sum is exactly zero gives the same gradient bits on both devices;
- clipping and summing run in torch on the gradients' device, so a full step agrees within
  float tolerance (float64: summation order only; float32: with TF32 off, see ``no_tf32``);
- ghost norms / book-keeping and materialised per-sample gradients give the same step on CUDA;
- the noise on CUDA has std sigma * C / expected batch size;
- bfloat16 / float16 models step on CUDA within their precision of the float64 step.

Skipped without a GPU or without the CUDA kernels in this build of ppml_fast. ``GPU`` is the
device the tests compare with the CPU.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from scipy import stats
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from ppml_fast.ops import cuda_available
from ppml_fast.privacy import DPOptimizer, PrivacyEngine, PrivateModule

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and cuda_available()),
        reason="needs a CUDA GPU and a build of ppml_fast with the CUDA kernels",
    ),
]

GPU = "cuda"
MODELS = ("mlp", "cnn", "text")
# C = 3: the per-sample gradient norms of the three problems span about 2 to 4, so some samples
# are clipped and some are not.
SIGMA, MAX_NORM, SEED, LR = 1.0, 3.0, 2**64 - 77, 0.5
# Float tolerance of a CPU-vs-GPU step (rtol, atol): gradients here are O(1), noise included.
# float64 differs by summation order only (~1e-15 relative); float32 by ~1e-7 per reduction.
TOL = {torch.float64: (1e-9, 1e-12), torch.float32: (1e-4, 2e-5)}


@pytest.fixture(autouse=True)
def no_tf32():
    """float32 convolutions default to TF32 on cuDNN (10-bit mantissa): off for these tests,
    restored after."""
    before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, 1, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.conv2 = nn.Conv2d(4, 8, 3, 2)
        self.fc = nn.Linear(8 * 3 * 3, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.conv2(x)), 1)
        return self.fc(x.flatten(1))


class SmallText(nn.Module):
    """Embedding, one encoder layer (plain nn.MultiheadAttention, no dropout: the CPU and CUDA
    dropout streams differ), token mean, linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(50, 16)
        self.encoder = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embedding(tokens)).mean(dim=1))


def _problem(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """(model in float32 on the CPU, inputs drawn in float64 or int64, labels); one seed."""
    g = torch.Generator().manual_seed(11)
    torch.manual_seed(12)
    if name == "mlp":
        net = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 16), nn.Tanh(),
                            nn.Linear(16, 5))
        x = torch.randn(16, 20, generator=g, dtype=torch.float64) * 2
    elif name == "cnn":
        net = SmallCNN()
        x = torch.randn(12, 1, 8, 8, generator=g, dtype=torch.float64) * 2
    else:
        net = SmallText()
        x = torch.randint(0, 50, (8, 6), generator=g)
    y = torch.randint(0, 5, (x.shape[0],), generator=g)
    return net, x, y


def _step(name: str, device: str, dtype: torch.dtype, *, mode: str = "ghost",
          clipping: str = "flat", steps: int = 2, zero_loss: bool = False,
          weights_dtype: torch.dtype | None = None, secure: bool = False,
          sigma: float = SIGMA):
    """``steps`` DP steps of ``PrivacyEngine`` (fixed batch, noise seed SEED) on ``device`` in
    ``dtype``. ``weights_dtype``: round the initial weights and float inputs through it first
    (a float64 reference of a 16-bit run sees the same starting values). Returns (the last
    step's gradients, the parameters after it — both float64 on the CPU — the noise offset, and
    the devices of the gradients)."""
    net, x, y = _problem(name)
    via = weights_dtype or dtype
    net = copy.deepcopy(net).to(via).to(device=device, dtype=dtype)
    if x.is_floating_point():
        x = x.to(via).to(dtype)
    x, y = x.to(device), y.to(device)
    loader = DataLoader(TensorDataset(x, y), batch_size=len(x))
    with warnings.catch_warnings():  # poisson_sampling=False warns about the reported epsilon
        warnings.simplefilter("ignore")
        model, opt, _ = PrivacyEngine(secure_mode=secure).make_private(
            module=net, optimizer=torch.optim.SGD(net.parameters(), lr=LR), data_loader=loader,
            noise_multiplier=sigma, max_grad_norm=MAX_NORM, poisson_sampling=False,
            clipping=clipping, grad_sample_mode=mode,
            noise_seed=None if secure else SEED)  # a seed in secure mode is an error
    for _ in range(steps):
        opt.zero_grad()
        out = model(x)
        if out.dtype not in (torch.float32, torch.float64):
            out = out.float()  # the loss in float32 for 16-bit models, as autocast does
        loss = F.cross_entropy(out, y)
        (loss * 0.0 if zero_loss else loss).backward()
        opt.step()
    params = list(net.parameters())
    grads = [p.grad.detach().to("cpu", torch.float64) for p in params]
    after = [p.detach().to("cpu", torch.float64) for p in params]
    return grads, after, opt.offset, {p.grad.device.type for p in params}


def _assert_close(got: list[torch.Tensor], want: list[torch.Tensor], rtol: float, atol: float,
                  what: str) -> None:
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}[{i}]: {m}")


@pytest.mark.parametrize("mode", ["ghost", "materialize"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name", MODELS)
def test_dp_step_on_cuda_matches_cpu(name, dtype, mode):
    g_cpu, p_cpu, off_cpu, _ = _step(name, "cpu", dtype, mode=mode)
    g_gpu, p_gpu, off_gpu, devices = _step(name, GPU, dtype, mode=mode)
    assert devices == {torch.device(GPU).type}
    assert off_gpu == off_cpu > 0  # the same noise stream, advanced alike
    rtol, atol = TOL[dtype]
    _assert_close(g_gpu, g_cpu, rtol, atol, "gradients")
    _assert_close(p_gpu, p_cpu, rtol, atol, "parameters")


@pytest.mark.parametrize("clipping", ["flat", "per_layer", "automatic"])
def test_clipping_modes_on_cuda_match_cpu(clipping):
    g_cpu, p_cpu, _, _ = _step("mlp", "cpu", torch.float64, clipping=clipping)
    g_gpu, p_gpu, _, _ = _step("mlp", GPU, torch.float64, clipping=clipping)
    _assert_close(g_gpu, g_cpu, *TOL[torch.float64], "gradients")
    _assert_close(p_gpu, p_cpu, *TOL[torch.float64], "parameters")


@pytest.mark.parametrize("name", MODELS)
def test_ghost_equals_materialize_on_cuda(name):
    ghost = _step(name, GPU, torch.float64, mode="ghost")
    full = _step(name, GPU, torch.float64, mode="materialize")
    _assert_close(ghost[0], full[0], *TOL[torch.float64], "gradients")
    _assert_close(ghost[1], full[1], *TOL[torch.float64], "parameters")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=str)
def test_noise_of_a_zero_gradient_step_is_bit_identical_to_cpu(dtype):
    # zero loss: every clipped sum is exactly 0, so the gradient is the noise / batch size alone
    g_cpu, _, off_cpu, _ = _step("mlp", "cpu", dtype, zero_loss=True, steps=2)
    g_gpu, _, off_gpu, _ = _step("mlp", GPU, dtype, zero_loss=True, steps=2)
    assert off_gpu == off_cpu
    for i, (a, b) in enumerate(zip(g_gpu, g_cpu)):
        assert torch.equal(a, b), f"gradient[{i}] differs between {GPU} and cpu"
        assert bool((a != 0).any())


def test_noise_std_on_cuda_is_sigma_c_over_expected_batch_size():
    torch.manual_seed(0)
    model = nn.Linear(200, 100).to(GPU)
    private = PrivateModule(model)
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), module=private,
                      noise_multiplier=2.0, max_grad_norm=3.0, expected_batch_size=8.0, seed=5)
    (private(torch.randn(4, 200, device=GPU)) * 0.0).sum().backward()
    opt.step()
    noise = torch.cat([p.grad.flatten() for p in model.parameters()]).double().cpu().numpy()
    assert stats.kstest(noise / (2.0 * 3.0 / 8.0), "norm").pvalue > 1e-4


def test_secure_noise_on_cuda_has_the_right_moments():
    grads, _, _, devices = _step("mlp", GPU, torch.float64, zero_loss=True, steps=1, secure=True)
    assert devices == {torch.device(GPU).type}
    noise = torch.cat([g.flatten() for g in grads])
    std = SIGMA * MAX_NORM / 16  # sigma * C / batch
    n = noise.numel()
    assert abs(float(noise.mean())) < 5 * std / math.sqrt(n)
    assert abs(float(noise.var()) / std**2 - 1.0) < 5 * math.sqrt(2.0 / (n - 1))


def test_empty_batch_step_on_cuda_is_noise_only_and_matches_cpu():
    results = []
    for device in ("cpu", GPU):
        torch.manual_seed(0)
        model = nn.Linear(5, 3).to(device)
        private = PrivateModule(model)
        opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), module=private,
                          noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=0.2, seed=3)
        x = torch.zeros(0, 5, device=device)
        y = torch.zeros(0, dtype=torch.long, device=device)
        F.cross_entropy(private(x), y, reduction="sum").backward()
        opt.step()
        results.append([p.grad.detach().cpu() for p in model.parameters()])
    for a, b in zip(*results):
        assert torch.isfinite(b).all() and torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", MODELS)
def test_16bit_step_on_cuda_is_within_its_precision_of_float64(name, dtype):
    # The reference starts from the same 16-bit-rounded weights and inputs, in float64 on the
    # CPU. Little noise (sigma 0.05), so that the clipped sum dominates the gradient. A 16-bit
    # step rounds every activation and gradient (unit roundoff eps / 2) through a few layers and
    # the noise once; the same comparison on the CPU (torch 2.13) measured at most
    # 3.1 eps * scale (the CNN in bfloat16), 0.7 elsewhere. Bound: 8 eps * scale.
    g_ref, _, off_ref, _ = _step(name, "cpu", torch.float64, weights_dtype=dtype, steps=1,
                                 sigma=0.05)
    g_gpu, _, off_gpu, devices = _step(name, GPU, dtype, steps=1, sigma=0.05)
    assert devices == {torch.device(GPU).type} and off_gpu == off_ref
    scale = max(float(g.abs().max()) for g in g_ref)
    bound = 8 * torch.finfo(dtype).eps * scale
    for i, (a, b) in enumerate(zip(g_gpu, g_ref)):
        assert torch.isfinite(a).all(), f"gradient[{i}] is not finite"
        err = float((a - b).abs().max())
        assert err <= bound, f"gradient[{i}]: max error {err:.3g} > {bound:.3g} (scale {scale:.3g})"
