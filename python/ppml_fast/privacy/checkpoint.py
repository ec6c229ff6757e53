"""PrivacyEngine checkpoints with Opacus 1.6's names and file layout, made resume-safe.

``save_checkpoint(path, module=, optimizer=, noise_scheduler=, grad_clip_scheduler=,
checkpoint_dict=, module_state_dict_kwargs=, torch_save_kwargs=)`` writes one ``torch.save``
dict with Opacus's keys (``module_state_dict``, ``privacy_accountant_state_dict``,
``optimizer_state_dict``, ``noise_scheduler_state_dict``, ``grad_clip_scheduler_state_dict``),
atomically (temporary file, fsync, rename: a crash leaves the old checkpoint or the new one).
``load_checkpoint(path, module=, optimizer=, ...)`` loads them back and returns the rest of the
dict, as Opacus does, with two differences:

- it is atomic: the checkpoint is read and every part validated before anything changes, and
  a part that fails to load restores the parts loaded before it (the module's tensors are
  copied first for that);
- the optimizer's state is loaded by :meth:`DPOptimizer.load_state_dict`, which with a journal
  (``make_private(journal=...)``) counts every step recorded after the checkpoint and continues
  the noise after the last reserved offset (:mod:`ppml_fast.privacy.state`). Without a journal a
  crash between checkpoints loses the count of the steps released since the last one.

``torch.load`` runs with ``weights_only=True`` unless ``torch_load_kwargs`` says otherwise (a
checkpoint holds only tensors and plain containers). The checkpoint holds the noise key: treat
it as secret (whoever has it and a released gradient can remove the noise of seeded runs).
"""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
from typing import Any, Optional

import torch

MODULE, ACCOUNTANT, OPTIMIZER = "module_state_dict", "privacy_accountant_state_dict", "optimizer_state_dict"
NOISE_SCHEDULER, CLIP_SCHEDULER = "noise_scheduler_state_dict", "grad_clip_scheduler_state_dict"


def save_checkpoint(engine, path, *, module, optimizer=None, noise_scheduler=None,
                    grad_clip_scheduler=None, checkpoint_dict: Optional[dict] = None,
                    module_state_dict_kwargs: Optional[dict] = None,
                    torch_save_kwargs: Optional[dict] = None) -> None:
    checkpoint = dict(checkpoint_dict or {})
    checkpoint[MODULE] = module.state_dict(**(module_state_dict_kwargs or {}))
    checkpoint[ACCOUNTANT] = engine.accountant.state_dict()
    if optimizer is not None:
        checkpoint[OPTIMIZER] = optimizer.state_dict()
    if noise_scheduler is not None:
        checkpoint[NOISE_SCHEDULER] = noise_scheduler.state_dict()
    if grad_clip_scheduler is not None:
        checkpoint[CLIP_SCHEDULER] = grad_clip_scheduler.state_dict()
    if not isinstance(path, (str, os.PathLike)):  # a file object: written as given
        torch.save(checkpoint, path, **(torch_save_kwargs or {}))
        return
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f, **(torch_save_kwargs or {}))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def load_checkpoint(engine, path, *, module, optimizer=None, noise_scheduler=None,
                    grad_clip_scheduler=None, module_load_dict_kwargs: Optional[dict] = None,
                    torch_load_kwargs: Optional[dict] = None) -> dict:
    kwargs = {"weights_only": True, **(torch_load_kwargs or {})}
    checkpoint = torch.load(path, **kwargs)
    if not isinstance(checkpoint, dict) or MODULE not in checkpoint or ACCOUNTANT not in checkpoint:
        raise ValueError(f"{path!r} is not a PrivacyEngine checkpoint (a dict with {MODULE!r} and "
                         f"{ACCOUNTANT!r}); nothing was loaded")
    opt_state = checkpoint.pop(OPTIMIZER, None) or {}
    noise_state = checkpoint.pop(NOISE_SCHEDULER, None) or {}
    clip_state = checkpoint.pop(CLIP_SCHEDULER, None) or {}
    if (optimizer is not None) != bool(opt_state):
        raise ValueError(f"the checkpoint {'has no' if optimizer is not None else 'has an'} optimizer "
                         f"state but optimizer={'a DPOptimizer' if optimizer is not None else 'None'} "
                         "was passed: pass the DP optimizer to resume its noise and accounting; "
                         "nothing was loaded")
    if optimizer is not None:
        from ppml_fast.privacy import state as _state

        _state.parse(opt_state)  # every field checked before anything changes
    acc_trial = copy.deepcopy(engine.accountant)
    acc_trial.load_state_dict(checkpoint[ACCOUNTANT])  # ValueError before anything changes
    undo: list[Any] = []
    try:
        saved_module = {k: v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                        for k, v in module.state_dict().items()}
        undo.append(lambda: module.load_state_dict(saved_module))
        module.load_state_dict(checkpoint.pop(MODULE), **(module_load_dict_kwargs or {}))
        if optimizer is None or optimizer.accountant is not engine.accountant:
            acc_before = engine.accountant.state_dict()
            undo.append(lambda: engine.accountant.load_state_dict(acc_before))
            engine.accountant.load_state_dict(acc_trial.state_dict())
        checkpoint.pop(ACCOUNTANT)
        for obj, st in ((noise_scheduler, noise_state), (grad_clip_scheduler, clip_state)):
            if obj is not None and st:
                before = obj.state_dict()
                undo.append(lambda obj=obj, before=before: obj.load_state_dict(before))
                obj.load_state_dict(st)
        if optimizer is not None:  # last: atomic itself; counts the journal's records
            optimizer.load_state_dict(opt_state)
    except BaseException:
        for fn in reversed(undo):
            with contextlib.suppress(Exception):
                fn()
        raise
    return checkpoint


def load_engine_state(engine, state: object) -> None:
    """``PrivacyEngine.load_state_dict``: validated and atomic like the optimizer's."""
    if not isinstance(state, dict) or "accountant" not in state:
        raise ValueError(f"state must be a PrivacyEngine.state_dict() dict with 'accountant'; got {state!r:.80}")
    opt_state = state.get("optimizer")
    if engine.optimizer is not None and opt_state is not None:
        if engine.optimizer.accountant is engine.accountant:
            engine.optimizer.load_state_dict(opt_state)  # loads the shared accountant too
            return
        trial = copy.deepcopy(engine.accountant)
        trial.load_state_dict(state["accountant"])
        engine.optimizer.load_state_dict(opt_state)
        engine.accountant.load_state_dict(trial.state_dict())
        return
    trial = copy.deepcopy(engine.accountant)
    trial.load_state_dict(state["accountant"])  # ValueError: nothing changed
    engine.accountant.load_state_dict(trial.state_dict())
