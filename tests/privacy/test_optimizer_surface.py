"""The DP optimizer is a torch.optim.Optimizer (issue 17 item 1): LR schedulers (torch's and
transformers'), zero_grad(set_to_none=), step hooks, deepcopy and torch.amp.GradScaler work."""

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ppml_fast import PrivacyEngine
from ppml_fast.privacy import DPOptimizer


def _setup(lr=0.1, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    data = TensorDataset(torch.randn(64, 4), torch.randint(0, 3, (64,)))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    kw.setdefault("noise_multiplier", 1.0)
    private, dp_opt, loader = PrivacyEngine().make_private(
        module=model, optimizer=opt, data_loader=DataLoader(data, batch_size=16), max_grad_norm=1.0, **kw)
    return private, dp_opt, loader, data


def _loop(private, dp_opt, loader, scheduler=None):
    for x, y in loader:
        dp_opt.zero_grad()
        nn.functional.cross_entropy(private(x), y).backward()
        dp_opt.step()
        if scheduler is not None:
            scheduler.step()


def test_is_an_optimizer_sharing_the_wrapped_groups_and_state():
    _, dp_opt, _, _ = _setup()
    assert isinstance(dp_opt, torch.optim.Optimizer)
    assert dp_opt.param_groups is dp_opt.original_optimizer.param_groups
    assert dp_opt.state is dp_opt.original_optimizer.state
    with pytest.raises(TypeError, match="already a DPOptimizer"):
        DPOptimizer(dp_opt, module=dp_opt.module, noise_multiplier=1.0, max_grad_norm=1.0,
                    expected_batch_size=16)


@pytest.mark.parametrize("make", [
    lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5),
    lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.2, total_steps=10),
], ids=["StepLR", "OneCycleLR"])
def test_torch_lr_schedulers_drive_the_wrapped_optimizer(make):
    private, dp_opt, loader, _ = _setup()
    sched = make(dp_opt)
    with _no_warning():
        _loop(private, dp_opt, loader, sched)
    assert dp_opt.steps == len(loader)
    assert dp_opt.original_optimizer.param_groups[0]["lr"] == sched.get_last_lr()[0]


class _no_warning:  # the scheduler must not warn that step() was never called on the optimizer
    def __enter__(self):
        import warnings
        self._ctx = warnings.catch_warnings(record=True)
        self.w = self._ctx.__enter__()
        warnings.simplefilter("always")

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        assert not [w for w in self.w if "optimizer.step()" in str(w.message)], [str(w.message) for w in self.w]


def test_transformers_linear_schedule_with_warmup():
    from transformers import get_linear_schedule_with_warmup

    private, dp_opt, loader, _ = _setup()
    sched = get_linear_schedule_with_warmup(dp_opt, num_warmup_steps=1, num_training_steps=4)
    _loop(private, dp_opt, loader, sched)
    assert dp_opt.param_groups[0]["lr"] == pytest.approx(0.0)  # warm-up then linear decay to 0


def test_zero_grad_set_to_none_false_and_step_hooks():
    private, dp_opt, loader, _ = _setup()
    seen = []
    dp_opt.register_step_post_hook(lambda opt, args, kwargs: seen.append(opt.steps))
    _loop(private, dp_opt, loader)
    assert seen == list(range(1, len(loader) + 1))
    dp_opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in private.parameters())


def test_deepcopy_keeps_the_privacy_state():
    private, dp_opt, loader, _ = _setup()
    _loop(private, dp_opt, loader)
    twin = copy.deepcopy(dp_opt)
    assert twin.steps == dp_opt.steps and twin.offset == dp_opt.offset
    assert isinstance(twin, torch.optim.Optimizer)


def test_grad_scaler_divides_the_loss_scale_out_before_clipping():
    results = []
    for use_scaler in (False, True):
        private, dp_opt, _, data = _setup(noise_multiplier=0.0, poisson_sampling=False)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        x, y = data.tensors[0][:16], data.tensors[1][:16]
        for _ in range(3):
            dp_opt.zero_grad()
            loss = nn.functional.cross_entropy(private(x), y)
            if use_scaler:
                scaler.scale(loss).backward()
                scaler.step(dp_opt)
                scaler.update()
            else:
                loss.backward()
                dp_opt.step()
        results.append([p.detach().clone() for p in private.parameters()])
        assert dp_opt.steps == 3
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_an_os_drawn_noise_key_never_leaves_in_the_state_and_a_user_seed_does():
    private, dp_opt, loader, _ = _setup()
    _loop(private, dp_opt, loader)
    state = dp_opt.state_dict()
    assert state["seed"] is None  # with it and two model checkpoints the noise could be removed
    old_key = dp_opt.seed
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dp_opt.load_state_dict(state)
    assert dp_opt.seed != old_key and dp_opt.offset == 0  # a fresh key: nothing replayed
    private2, seeded, loader2, _ = _setup(noise_seed=5)
    assert seeded.state_dict()["seed"] == 5


def test_an_empty_poisson_batch_of_a_mapping_collator_is_empty():
    from collections import UserDict

    from ppml_fast.privacy.data import DPDataLoader

    class Encoding(UserDict):  # like transformers' BatchEncoding
        pass

    ds = [{"x": torch.tensor([float(i)])} for i in range(10)]

    def collate(items):
        return Encoding({"x": torch.stack([it["x"] for it in items])})

    loader = DPDataLoader(ds, sample_rate=1e-9, num_batches=2, collate_fn=collate)
    batch = next(iter(loader))
    assert isinstance(batch, Encoding) and batch["x"].shape == (0, 1)
