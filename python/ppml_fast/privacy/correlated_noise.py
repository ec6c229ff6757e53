"""Correlated noise for DP-FTRL and banded matrix factorization: the stateful generator of the
gradient-space noise w_t that replaces DP-SGD's fresh Gaussian (issue 19 item 1).

The mechanism (Denisov et al. 2022, arXiv 2202.08312, section 2; Choquette-Choo et al. 2023,
arXiv 2211.06530, eq. (1)): for the prefix-sum workload A = B C, release C x + z with z iid
N(0, sigma^2 Clip^2 I); the optimizer sees x_t + w_t with w = C^{-1} z, so the noisy gradients
are a bijective post-processing of C x + z. The strategy C comes from
:mod:`ppml_fast.accounting.matrix_factorization` (``NoiseStrategy``); this module only draws.

- **banded / identity** (``row(t)`` = [C[t,t], C[t,t-1], ..., C[t,t-k]]): one fresh N(0, I_P)
  vector z_t per step and the recursion w_t = (z_t - sum_{j>=1} C[t,t-j] w_{t-j}) / C[t,t]
  (forward substitution of C w = z; Choquette-Choo et al. 2023, arXiv 2306.08153, Alg. 1).
  Memory: the last b-1 w's, on the parameters' device in the clipped sums' dtype: O(b P).
- **tree** (``prefix_nodes(t)``, Kairouz et al. 2021, arXiv 2103.00039, section 3 / Alg. 1):
  one fresh N(0, I_P) vector per tree node; w_t = sum(prefix_nodes(t)) - sum(prefix_nodes(t-1)).
  *Decision:* the noises of the current path (at most floor(log2 T) + 1 vectors) are **stored**,
  not regenerated from their offsets: secure mode draws ChaCha20 keyed afresh from OS entropy on
  every call, so a node's noise cannot be drawn twice there, and storing costs O(log T) vectors.

Offsets (DESIGN.md invariant 3): every fresh vector comes from the native op
(``ops.add_gaussian_noise_``, std 1) at an offset range the optimizer reserved (and journaled)
before the step; :meth:`CorrelatedNoise.blocks` says how many blocks a step needs, and a step's
range is never used twice. The generator is transactional: :meth:`draw` computes w_t without
changing the generator; only :meth:`commit` (after the step was accounted) moves it on, so a
step that fails closed leaves the recursion as it was (its z was never released).

State (:meth:`state_dict`): the plan (mechanism, steps, bands, a fingerprint of C, the
participation schema), the step, where the current *segment* began, and the offsets of the
fresh vectors the kept w's derive from — **never the w's themselves**: with w_{t-1} and two
successive model checkpoints anyone could subtract the noise and read g_{t-1} (the same reason
an OS-drawn noise key never enters a checkpoint, privacy/state.py). On load, the recursion
continues exactly only when (a) the noise key is the saved one (a user-given seed, not secure
mode) — then the kept w's are redrawn from their offsets (tree: the path's nodes; banded:
the segment's z's replayed, costing about the noise of the segment's steps) — and (b) a journal
proves no step was released after the state was saved. Otherwise a **new segment** starts at
the loaded step: a fresh strategy of the remaining steps (same banded coefficients / a new
tree), accounted from its own row 0. That is conservative: the old segment's released rows and
the new segment are two independent Gaussian matrix mechanisms, and each is charged for its own
worst-case participation pattern (adaptive composition). Continuing the old recursion with a
fresh z after steps were released past the checkpoint would not be: two releases of row t with
the same past w's are not covered by the per-step increments S_t - S_{t-1}.

The noise std must stay fixed for the whole run (the per-step events compose to one Gaussian
with sensitivity sqrt(S_T) only for a constant sigma C): a changed std is refused. So is a
changed noise multiplier sigma at the same std (C lowered and sigma raised): row t of C also
holds earlier steps' gradients, clipped at the old, larger C, while step t's event would use the
new sigma (tree, steps 0-1: reported 1.25 / sigma^2, true 2 / sigma^2).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections import deque
from typing import Optional, Sequence

import numpy as np
import torch

from ppml_fast.accounting.errors import PrivacyError
from ppml_fast.ops import noise as _noise
from ppml_fast.ops.noise import add_gaussian_noise_

KINDS = ("identity", "banded", "tree")


def fingerprint(strategy) -> str:
    """16 hex digits naming C: its kind, steps, bands and (banded) coefficients and column scale."""
    h = hashlib.sha256(f"{strategy.kind}|{strategy.steps}|{strategy.bands}".encode())
    for name in ("coefficients", "column_scale"):
        v = getattr(strategy, name, None)
        if v is not None:
            h.update(np.asarray(v, dtype=np.float64).tobytes())
    return h.hexdigest()[:16]


def _participation_dict(participation) -> dict:
    if dataclasses.is_dataclass(participation):
        return dataclasses.asdict(participation)
    return {"repr": repr(participation)}


def _like(grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.zeros_like(g, memory_format=torch.contiguous_format) for g in grads]


class CorrelatedNoise:
    """Draws w_t, in units of one standard normal per coordinate, for ``strategy`` (module
    docstring); the optimizer multiplies by sigma C.

    Args:
        strategy: a ``NoiseStrategy`` (kind "identity", "banded" or "tree", ``steps`` = T, the
            planned number of steps).
        participation: the ``Participation`` schema the accountant assumes (its events come
            from ``strategy.step_event``).
        segment_strategy: ``f(steps) -> NoiseStrategy``, the strategy of a segment restarted
            with ``steps`` steps left; default: the same banded coefficients
            (``matrix_factorization.banded``) or a new tree (``matrix_factorization.tree``).
    """

    def __init__(self, strategy, participation, *, segment_strategy=None) -> None:
        kind = getattr(strategy, "kind", None)
        if kind not in KINDS:
            raise ValueError(f"strategy must be a NoiseStrategy of kind {KINDS}; got {strategy!r}")
        steps = strategy.steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"strategy.steps must be an int >= 1; got {steps!r}")
        self.strategy, self.participation = strategy, participation
        self.kind, self.steps, self.bands = kind, steps, strategy.bands
        self._segment_strategy = segment_strategy
        self.fingerprint = fingerprint(strategy)
        self.std: Optional[float] = None  # sigma C, fixed at the first step
        self.sigma: Optional[float] = None  # sigma, fixed at the first step (module docstring)
        self._reset(0, strategy)

    def _reset(self, start: int, seg) -> None:
        self.step = start  # global index of the next step
        self.segment_start = start
        self._seg = seg  # the current segment's strategy: its row 0 is global step ``start``
        self._ws: deque = deque()  # banded: the last b-1 w's, newest first
        self._nodes: dict[int, list[torch.Tensor]] = {}  # tree: the current path's node noises
        self._node_offsets: dict[int, int] = {}
        self._runs: list[list[int]] = []  # banded: [first offset, stride, count] of the z's
        self._pending = None

    # -- one step ------------------------------------------------------------------------------
    def check_step(self, step: int, std: float, sigma: Optional[float] = None) -> None:
        """Refuses (before anything changes) a step past the plan, out of sync, or at another std
        or noise multiplier ``sigma``."""
        if step >= self.steps:
            raise PrivacyError(
                f"step {step}: the correlated-noise plan has {self.steps} steps (noise mechanism "
                f"{self.kind!r}); its sensitivity and epsilon hold for those only; nothing was "
                "changed (plan more steps with steps=/epochs= at make_private)")
        if step != self.step:
            raise PrivacyError(f"step {step}: the correlated noise is at step {self.step}; the "
                               "optimizer's step count was changed by hand; nothing was changed")
        if self.std is not None and not math.isclose(std, self.std, rel_tol=1e-12):
            raise PrivacyError(
                f"step {step}: the noise std (noise_multiplier x max_grad_norm) is {std!r}, but the "
                f"correlated noise was started at {self.std!r}: the accounting of a matrix "
                "mechanism holds for one constant std (no noise or clipping schedules); nothing "
                "was changed")
        if sigma is not None and self.sigma is not None \
                and not math.isclose(sigma, self.sigma, rel_tol=1e-12):
            raise PrivacyError(
                f"step {step}: the noise multiplier is {sigma!r}, but the correlated noise was "
                f"started at {self.sigma!r}: a matrix mechanism's per-step events hold for one "
                "constant sigma and clipping norm (rows of C also hold earlier steps' gradients, "
                "clipped at the earlier norm), also at an unchanged std; nothing was changed")

    def _new_nodes(self, t: int) -> tuple[list[int], list[int]]:
        now = set(self._seg.prefix_nodes(t))
        before = set(self._seg.prefix_nodes(t - 1)) if t > 0 else set()
        return sorted(now - before), sorted(before - now)

    def vectors(self) -> int:
        """Fresh N(0, I_P) vectors the next step draws (tree: its new nodes; else 1)."""
        if self.kind == "tree":
            return len(self._new_nodes(self.step - self.segment_start)[0])
        return 1

    def blocks(self, grads: Sequence[torch.Tensor]) -> int:
        """Philox blocks the next step uses on tensors shaped like ``grads``."""
        return self.vectors() * _noise.blocks(grads)

    def draw(self, grads: Sequence[torch.Tensor], *, seed: int, offset: int,
             secure: bool) -> list[torch.Tensor]:
        """w_t for the next step, shaped like ``grads``, from the fresh vectors at
        [offset, offset + blocks(grads)); the generator does not change until :meth:`commit`."""
        t = self.step - self.segment_start
        per = _noise.blocks(grads)
        self._check_shapes(grads)
        if self.kind == "tree":
            new, gone = self._new_nodes(t)
            fresh, w = {}, _like(grads)
            for i, n in enumerate(new):
                z = _like(grads)
                add_gaussian_noise_(z, 1.0, seed=seed, offset=offset + i * per, secure=secure)
                fresh[n] = (z, offset + i * per)
                torch._foreach_add_(w, z)
            for n in gone:
                torch._foreach_sub_(w, self._nodes[n])
            self._pending = ("tree", w, fresh, gone)
            return w
        row = [float(c) for c in self._seg.row(t)]
        if not (row and math.isfinite(row[0]) and row[0] != 0 and len(row) - 1 <= len(self._ws)):
            raise ValueError(f"strategy row {t} must start with a finite non-zero C[t,t] and reach "
                             f"back at most {len(self._ws)} steps; got {row!r}")
        w = _like(grads)
        add_gaussian_noise_(w, 1.0, seed=seed, offset=offset, secure=secure)  # z_t
        for c, prev in zip(row[1:], self._ws):
            if c != 0.0:
                torch._foreach_add_(w, prev, alpha=-c)
        torch._foreach_div_(w, row[0])
        self._pending = ("banded", w, offset, per)
        return w

    def _check_shapes(self, grads) -> None:
        kept = next(iter(self._ws), None) or next(iter(self._nodes.values()), None)
        if kept is not None and [(g.shape, g.dtype, g.device) for g in grads] != \
                [(k.shape, k.dtype, k.device) for k in kept]:
            raise ValueError(
                f"step {self.step}: the noised parameters changed (shapes, dtypes or devices) since "
                f"step {self.segment_start}: correlated noise continues one vector per parameter "
                "set; do not freeze, unfreeze or move parameters during a tree / banded_mf run")

    def add_(self, grads: list[torch.Tensor], std: float, *, seed: int, offset: int,
             secure: bool) -> int:
        """``grads += std * w_t`` in place; returns the next unused offset."""
        w = self.draw(grads, seed=seed, offset=offset, secure=secure)
        for g, wi in zip(grads, w):
            g.add_(wi, alpha=std)
        return offset + self.blocks(grads)

    def commit(self, std: float, sigma: Optional[float] = None) -> None:
        """The drawn step was released and accounted: keep what later steps need."""
        if self._pending is None:
            raise RuntimeError("commit() without a draw()")
        kind, w, *rest = self._pending
        if kind == "tree":
            fresh, gone = rest
            for n in gone:
                self._nodes.pop(n, None)
                self._node_offsets.pop(n, None)
            for n, (z, off) in fresh.items():
                self._nodes[n], self._node_offsets[n] = z, off
        else:
            offset, per = rest
            if self.bands is None or self.bands > 1:
                self._ws.appendleft(w)
                keep = (self.bands or 1) - 1
                while len(self._ws) > keep:
                    self._ws.pop()
            last = self._runs[-1] if self._runs else None
            if last is not None and last[1] == per and last[0] + per * last[2] == offset:
                last[2] += 1
            else:
                self._runs.append([offset, per, 1])
        self._pending = None
        self.step += 1
        self.std = float(std) if self.std is None else self.std
        if self.sigma is None and sigma is not None:
            self.sigma = float(sigma)

    def discard(self) -> None:
        """The drawn step failed: forget it (its range is never reused; the optimizer moved on)."""
        self._pending = None

    # -- accounting ----------------------------------------------------------------------------
    def event(self, step: int, noise_multiplier: float):
        """The event to compose after global step ``step`` (None: nothing), from the current
        segment's strategy: ``step_event(step - segment_start, sigma, participation)``."""
        return self._seg.step_event(step - self.segment_start, noise_multiplier, self.participation)

    def planned_events(self, noise_multiplier: float) -> list:
        """The events of every step of the plan from the current step on (for calibration)."""
        return [e for t in range(self.step, self.steps)
                if (e := self.event(t, noise_multiplier)) is not None]

    @property
    def analysis(self) -> str:
        """The sentence ``PrivacyEngine.accounting_analysis`` reports for this plan."""
        p = self.participation
        kind = getattr(p, "kind", None)
        schema = {
            "every_epoch": f"fixed order, a record every {getattr(p, 'steps_per_epoch', None)} steps",
            "min_separated": (f"a record's steps >= {getattr(p, 'min_separation', None)} apart, at most "
                              f"{getattr(p, 'max_participations', None)} of them"),
            "cyclic_poisson": (f"cyclic Poisson sampling over {getattr(p, 'min_separation', None)} parts "
                               f"at rate {getattr(p, 'sample_rate', 0) or 0:.6g}"),
            "single": "each record in one step",
        }.get(kind, repr(p))
        how = ("amplified BandMF: ceil(T/b) Poisson-sampled Gaussians at sigma / zeta (Choquette-Choo "
               "et al. 2023, arXiv 2306.08153, Thm. 4), add/remove adjacency" if kind == "cyclic_poisson"
               else "the Gaussian mechanism with sensitivity sqrt(S_t) of the rows released, composed "
               "step by step (Choquette-Choo et al. 2023, arXiv 2211.06530, sec. 2), zero-out "
               "adjacency, no amplification")
        seg = f", a new segment since step {self.segment_start}" if self.segment_start else ""
        bands = f", b={self.bands}" if self.kind == "banded" else ""
        return f"correlated noise ({self.kind}, T={self.steps}{bands}{seg}); {schema}; {how}"

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The plan, the step, the segment and the offsets of the kept noise (never the noise)."""
        return {"kind": self.kind, "steps": self.steps, "bands": self.bands,
                "fingerprint": self.fingerprint,
                "participation": _participation_dict(self.participation),
                "step": self.step, "segment_start": self.segment_start, "std": self.std,
                "sigma": self.sigma, "runs": [list(r) for r in self._runs],
                "nodes": {int(n): int(o) for n, o in self._node_offsets.items()}}

    def check_state(self, saved: object) -> dict:
        """``saved`` (a :meth:`state_dict`) checked against this plan; ValueError names the field."""
        if not isinstance(saved, dict):
            raise ValueError(f"state['correlated_noise'] must be a dict; got {type(saved).__name__}")
        mine = {"kind": self.kind, "steps": self.steps, "bands": self.bands,
                "fingerprint": self.fingerprint,
                "participation": _participation_dict(self.participation)}
        for k, v in mine.items():
            if saved.get(k) != v:
                raise ValueError(f"state['correlated_noise'][{k!r}] is {saved.get(k)!r}, this optimizer's "
                                 f"is {v!r}: the state is of another noise plan; nothing was loaded")

        def ints(v, n):
            return isinstance(v, list) and all(isinstance(r, list) and len(r) == n and all(
                isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in r) for r in v)

        step, start, std = saved.get("step"), saved.get("segment_start"), saved.get("std")
        ok = (isinstance(step, int) and isinstance(start, int) and 0 <= start <= step <= self.steps
              and (std is None or (isinstance(std, float) and std > 0))
              and (saved.get("sigma") is None or (isinstance(saved["sigma"], float) and saved["sigma"] > 0))
              and ints(saved.get("runs"), 3) and isinstance(saved.get("nodes"), dict)
              and ints([[k, v] for k, v in saved["nodes"].items()], 2))
        if not ok:
            raise ValueError(f"state['correlated_noise'] is malformed: {saved!r:.200}; nothing was loaded")
        return saved

    def resumed(self, saved: dict, *, like: Sequence[torch.Tensor], seed: Optional[int],
                exact: bool) -> "CorrelatedNoise":
        """A copy of this generator at ``saved``'s step: the same recursion (``exact``: the key
        ``seed`` is the saved one and nothing was released after the save; the kept noise is
        redrawn from its offsets) or a new segment starting there (module docstring)."""
        saved = self.check_state(saved)
        out = object.__new__(CorrelatedNoise)
        out.__dict__.update({k: v for k, v in self.__dict__.items()
                             if k in ("strategy", "participation", "kind", "steps", "bands",
                                      "_segment_strategy", "fingerprint")})
        out.std, out.sigma = saved["std"], saved.get("sigma")
        step, start = saved["step"], saved["segment_start"]
        if not exact or seed is None or step == start:
            out._reset(step, self.strategy if step == 0 else out._restarted(step))
            return out
        out._reset(start, self.strategy if start == 0 else out._restarted(start))
        if self.kind == "tree":
            for n, off in sorted(saved["nodes"].items()):
                z = _like(like)
                add_gaussian_noise_(z, 1.0, seed=seed, offset=off, secure=False)
                out._nodes[int(n)], out._node_offsets[int(n)] = z, int(off)
            out.step = step
            return out
        offsets = [o + i * per for o, per, count in saved["runs"] for i in range(count)]
        if len(offsets) != step - start:
            raise ValueError(f"state['correlated_noise'] has {len(offsets)} offsets for the "
                             f"{step - start} steps of its segment; nothing was loaded")
        for off in offsets:  # replay the segment: the same draws in the same order
            out.draw(like, seed=seed, offset=off, secure=False)
            out.commit(out.std, out.sigma)
        return out

    def _restarted(self, start: int):
        """The strategy of a segment that begins at global step ``start``."""
        left = self.steps - start
        if left <= 0:  # resumed at the end of the plan: every further step is refused
            return self.strategy
        if self._segment_strategy is not None:
            return self._segment_strategy(left)
        from ppml_fast.accounting import matrix_factorization as mf

        if self.kind == "tree":
            return mf.tree(left)
        if self.kind == "identity":
            return mf.identity(left)
        c = np.asarray(self.strategy.coefficients)[:left]  # the same band, from row 0 again
        scaled = bool(np.any(np.asarray(self.strategy.column_scale) != 1.0))
        return mf.banded(c, left, column_normalize=scaled)

    def __repr__(self) -> str:
        return (f"CorrelatedNoise({self.kind}, steps={self.steps}, bands={self.bands}, "
                f"step={self.step}, segment_start={self.segment_start})")
