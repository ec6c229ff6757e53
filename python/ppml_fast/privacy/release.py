"""The end of a DP step, after clipping: reduce, record, noise, account, and only then expose
the noisy gradient in ``p.grad`` — failing closed (DESIGN.md invariants 4 and 6).

Order, for :meth:`DPOptimizer.pre_step`:

1. ``_reduce`` (the distributed optimizer's all-reduce of the clipped sums);
2. reserve the noise offsets the step will use (``[offset, offset + blocks)``) and, with a
   journal, append the step's event and that range durably (fsync) — before any noise exists;
3. noise and scale the sums in place (``_noise_and_scale``);
4. compose the step's event into the accountant (atomic: on an error it is unchanged);
5. set ``p.grad``.

Any error in 1-5 (an I/O error of the journal, a noise kernel refusing its arguments, an
accountant refusing the event, a collective failing) fails closed: the step's sums are zeroed
in place and forgotten (also the clipped sums of earlier skipped parts of the same logical
step), every parameter's ``p.grad`` is set to None, so no un-noised or half-noised gradient is
readable; the accountant, ``steps`` and ``unnoised_steps`` are as before the step; the offset
moves past a reserved range (never reused, invariant 3), and a journal record already written
stays (it over-reports one step on resume: safe). The caller recomputes the batch to retry.

:func:`check_settings` runs before clipping and refuses settings a step could not use (a NaN
noise multiplier set by hand or by a schedule, a bad seed or offset), so common mistakes change
nothing at all.
"""

from __future__ import annotations

import contextlib
import math
import numbers

import torch

from ppml_fast.ops import noise
from ppml_fast.privacy.profiling import phase

OFFSET_LIMIT = 1 << 63  # offsets are signed 64-bit in torch schemas: a range never passes it


def check_settings(opt) -> None:
    """Refuses (ValueError naming the field) settings the step would fail on, before clipping."""
    sigma = opt.noise_multiplier
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"step {opt.steps}: noise_multiplier must be a finite number >= 0; got {sigma!r}; "
                         "nothing was changed")
    for name, value, limit in (("seed", opt.seed, 1 << 64), ("offset", opt.offset, 1 << 63)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < limit:
            raise ValueError(f"step {opt.steps}: {name} must be an int in [0, 2**{limit.bit_length() - 1}); "
                             f"got {value!r}; nothing was changed")


def finish_step(opt) -> None:
    """Steps 1-5 of the module docstring on ``opt``'s accumulated clipped sums."""
    params = opt.params
    grads = opt._grads()
    reserved = None
    try:
        opt._reduce(grads)
        sigma = opt.noise_multiplier
        event = opt._event() if sigma > 0 and opt.accountant is not None and opt.sample_rate is not None else None
        start = opt.offset
        end = start + opt._noise_blocks(grads) if sigma > 0 else start  # correlated: its own count
        if end > OFFSET_LIMIT:
            raise ValueError(f"step {opt.steps}: noise offsets [{start}, {end}) pass 2**63: the "
                             "stream would wrap and repeat noise; start a new noise key")
        if opt.journal is not None:
            opt.journal.reserve(step=opt.steps, event=event, unnoised=sigma == 0, seed=opt.seed,
                                offset=(start, end))
        reserved = end
        with phase("ppml::noise"):  # profile phase (benchmarks/profile_step.py)
            opt._noise_and_scale(grads)
        if opt.offset > end:
            raise RuntimeError(f"step {opt.steps}: the noise used offsets up to {opt.offset}, past the "
                               f"reserved range [{start}, {end}); the gradient was discarded")
        opt.offset = end
        out = [g if g.dtype == p.dtype else g.to(p.dtype) for p, g in zip(params, grads)]
        if event is not None:
            opt.accountant.compose(event)  # the last step that can fail
            try:
                opt._budget.composed(opt.accountant, event)
            except Exception:
                opt._budget.reset()  # caches only: rebuilt from the accountant at the next check
    except BaseException:
        _fail_closed(opt, grads, params, reserved)
        raise
    if sigma == 0:
        opt.unnoised_steps += 1  # no event: a Gaussian with sigma 0 has no finite epsilon
    for p, g in zip(params, out):  # 16-bit parameters: rounded after the noise
        p.grad = g


def _fail_closed(opt, grads, params, reserved) -> None:
    with torch.no_grad():
        for g in grads:
            with contextlib.suppress(Exception):
                g.zero_()
        for s in list(opt._summed.values()):
            with contextlib.suppress(Exception):
                s.zero_()
    for p in params:
        p.grad = None
    opt._summed, opt._samples = {}, 0
    if reserved is not None:
        opt.offset = max(opt.offset, reserved)  # a reserved range is never used again
