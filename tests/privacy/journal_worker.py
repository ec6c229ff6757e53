"""A training process for the kill -9 tests of the privacy journal (tests/privacy/test_journal.py).

    python journal_worker.py train DIR MODE STEPS CKPT_EVERY     (the process that is killed)
    resume(DIR, MODE, STEPS)                                     (the test's own process)

MODE: "journal" (make_private(journal=) + save/load_checkpoint), "checkpoint" (save/load_checkpoint
without a journal) or "legacy" (engine.state_dict() saved with torch.save, the pre-journal way).
The model's loss is multiplied by 0, so every released gradient is the noise alone (divided by
the expected batch size). Each released p.grad is appended (float32) to DIR/released.bin (or
DIR/resumed.bin) after step() returns; "step k" is printed after it. ``resume`` returns the
epsilon right after loading and the number of steps the accountant counts.
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ppml_fast.privacy import PrivacyEngine

DELTA = 1e-5


def build(directory: str, mode: str):
    torch.manual_seed(0)
    model = nn.Linear(20, 50)
    data = TensorDataset(torch.randn(64, 20), torch.zeros(64))
    engine = PrivacyEngine()
    journal = os.path.join(directory, "journal") if mode == "journal" else None
    module, opt, _ = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data_loader=DataLoader(data, batch_size=16), noise_multiplier=1.0, max_grad_norm=1.0,
        noise_seed=7, journal=journal)
    return engine, module, opt, data.tensors[0][:16]


def step(module, opt, x, out) -> None:
    opt.zero_grad()
    (module(x) * 0.0).sum().backward()
    opt.step()
    flat = torch.cat([p.grad.reshape(-1) for p in module.parameters()]).float()
    out.write(flat.numpy().tobytes())
    out.flush()


def save(engine, module, opt, directory: str, mode: str) -> None:
    path = os.path.join(directory, "ckpt.pt")
    if mode == "legacy":
        tmp = path + ".tmp"
        torch.save({"module": module.state_dict(), "engine": engine.state_dict()}, tmp)
        os.replace(tmp, path)
    else:
        engine.save_checkpoint(path, module=module, optimizer=opt)


def load(engine, module, opt, directory: str, mode: str) -> None:
    path = os.path.join(directory, "ckpt.pt")
    if mode == "legacy":
        state = torch.load(path, weights_only=False)
        module.load_state_dict(state["module"])
        engine.load_state_dict(state["engine"])
    else:
        engine.load_checkpoint(path, module=module, optimizer=opt)


def resume(directory: str, mode: str, steps: int) -> dict:
    import warnings

    engine, module, opt, x = build(directory, mode)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the no-journal resume warns; the test reads the numbers
        load(engine, module, opt, directory, mode)
    info = {"epsilon": engine.get_epsilon(DELTA), "steps": opt.steps,
            "counted": sum(h[-1] for h in engine.accountant.history)}
    with open(os.path.join(directory, "resumed.bin"), "ab") as out:
        for _ in range(steps):
            step(module, opt, x, out)
    if opt.journal is not None:
        opt.journal.close()
    return info


def main() -> None:
    directory, mode, steps, every = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    engine, module, opt, x = build(directory, mode)
    with open(os.path.join(directory, "released.bin"), "ab") as out:
        for k in range(1, steps + 1):
            step(module, opt, x, out)
            if k % every == 0:
                save(engine, module, opt, directory, mode)
            print(f"step {k}", flush=True)


if __name__ == "__main__":
    main()
