"""A pickled / deep-copied DPOptimizer must not carry what regenerates its released noise: no
OS-drawn key, no kept correlated-noise vectors; a user seed travels (reproducible by design)."""

import copy
import pickle

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ppml_fast.privacy import PrivacyEngine


def _opt(seed=None, **kw):
    torch.manual_seed(0)
    ds = TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,)))
    model = nn.Linear(4, 2)
    _, opt, dl = PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(ds, batch_size=8), noise_multiplier=1.0, max_grad_norm=1.0,
        noise_seed=seed, **kw)
    return model, opt, dl


def test_os_key_not_pickled_and_copy_rekeyed():
    _, opt, _ = _opt()
    blob = pickle.dumps(opt.__getstate__()["seed"])
    assert pickle.loads(blob) is None
    clone = copy.deepcopy(opt)
    assert clone.seed != opt.seed and isinstance(clone.seed, int)


def test_user_seed_travels():
    _, opt, _ = _opt(seed=1234)
    assert copy.deepcopy(opt).seed == 1234


def test_correlated_kept_noise_not_pickled():
    model, opt, dl = _opt(poisson_sampling=False, noise_mechanism="banded_mf", bands=3, epochs=2)
    for x, y in dl:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert len(opt.correlated._ws) > 0
    state = opt.__getstate__()
    assert state["seed"] is None and len(state["correlated"]._ws) == 0
    assert state["correlated"].segment_start == opt.correlated.step
