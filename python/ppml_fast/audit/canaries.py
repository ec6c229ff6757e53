"""Canaries: the records an audit may insert into the training data, and whose presence it then
tries to detect.

- Input-space canaries (:func:`input_canaries`): "mislabelled" copies of training inputs with
  a wrong label, or "ood" (out-of-distribution) uniform-noise inputs with random labels; both
  are memorised rather than generalised, so their loss says whether they were trained on.
- Gradient-space "dirac" canaries (:class:`DiracCanaries`, :class:`DiracCanaryMixin`): a
  record whose per-sample gradient is the clipping norm C times a one-hot vector on one
  coordinate of the model (Nasr et al., "Tight auditing of differentially private machine
  learning", USENIX Security 2023, Section 4; Steinke et al. 2023, Section 7). Such a gradient is
  already clipped (norm C, the sensitivity the accountant assumes), so it is injected directly
  into the clipped sum, as a real record of the batch would be — and like a real record it
  joins each Poisson-sampled batch with probability ``sample_rate``, independently.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from ppml_fast.audit import _checks
from ppml_fast.privacy.per_sample import sum_dtype

INPUT_KINDS = ("mislabelled", "ood")


def input_canaries(
    x: torch.Tensor,
    y: torch.Tensor,
    count: int,
    *,
    kind: str = "mislabelled",
    num_classes: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` canary records (inputs, labels) for a classification data set (x, y).

    "mislabelled": distinct random rows of ``x`` (with repetition only if count > len(x)),
    each with a label other than its own; "ood": inputs uniform in [x.min(), x.max()] with
    uniformly random labels. ``num_classes`` defaults to ``y.max() + 1``.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"x and y must be tensors; got {type(x).__name__} and {type(y).__name__}")
    if x.dim() < 1 or y.dim() != 1 or x.shape[0] != y.shape[0] or y.shape[0] == 0:
        raise ValueError(f"x must be (N, ...) and y (N,) with N >= 1; got {tuple(x.shape)} and {tuple(y.shape)}")
    if y.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"y must hold integer class labels; got {y.dtype}")
    count = _checks.count("count", count, minimum=1)
    if kind not in INPUT_KINDS:
        raise ValueError(f"kind must be one of {INPUT_KINDS}; got {kind!r}")
    c = int(y.max()) + 1 if num_classes is None else _checks.count("num_classes", num_classes, minimum=2)
    if c < 2 or int(y.max()) >= c or int(y.min()) < 0:
        raise ValueError(f"labels must lie in [0, num_classes) with num_classes >= 2; got labels in "
                         f"[{int(y.min())}, {int(y.max())}] and num_classes {c}")
    n = x.shape[0]
    if kind == "mislabelled":
        rows = torch.randperm(n, generator=generator)[:count]
        if count > n:
            rows = torch.randint(0, n, (count,), generator=generator)
        shift = torch.randint(1, c, (count,), generator=generator)
        return x[rows].clone(), (y[rows].long() + shift) % c
    lo, hi = float(x.min()), float(x.max())
    xs = torch.rand((count, *x.shape[1:]), generator=generator, dtype=torch.float64)
    xs = (lo + (hi - lo) * xs).to(x.dtype)
    return xs, torch.randint(0, c, (count,), generator=generator)


@dataclasses.dataclass(frozen=True)
class DiracCanaries:
    """``count`` distinct coordinates of a model's trainable parameters: canary i is the one-hot
    direction at ``flat_index[i]`` of parameter ``param_index[i]`` (index into the list the
    canaries were drawn from)."""

    param_index: torch.Tensor  # int64 (m,)
    flat_index: torch.Tensor  # int64 (m,)

    @property
    def count(self) -> int:
        return int(self.param_index.numel())

    @classmethod
    def draw(cls, params: list[torch.Tensor], count: int,
             generator: Optional[torch.Generator] = None) -> "DiracCanaries":
        """``count`` coordinates drawn uniformly without replacement from all of ``params``."""
        count = _checks.count("canaries", count, minimum=1)
        sizes = torch.tensor([p.numel() for p in params], dtype=torch.int64)
        total = int(sizes.sum())
        if count > total:
            raise ValueError(f"canaries must be <= the number of trainable parameters ({total}) for "
                             f"dirac canaries (one coordinate each); got {count}")
        flat = torch.randperm(total, generator=generator)[:count]
        ends = torch.cumsum(sizes, 0)
        pidx = torch.searchsorted(ends, flat, right=True)
        starts = ends - sizes
        return cls(pidx, flat - starts[pidx])

    def gather(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """The value of each canary's coordinate in ``tensors`` (one per parameter), float64."""
        out = torch.empty(self.count, dtype=torch.float64)
        for k, t in enumerate(tensors):
            sel = (self.param_index == k).nonzero().flatten()
            if sel.numel():
                out[sel] = t.detach().reshape(-1)[self.flat_index[sel]].double().cpu()
        return out


class DiracCanaryMixin:
    """A DPOptimizer stage override (mix in before the optimizer class): after the real records
    are clipped and summed, each *included* dirac canary joins this logical step's clipped sum
    with probability ``sample_rate`` as the vector ``norm * e_j`` (``norm``: the clipping norm,
    of its parameter with per-layer clipping — the largest contribution a record can make).
    :meth:`setup_canaries` must be called before the first step; ``canary_observations``
    then collects, after each step, the noisy gradient at every canary coordinate divided by
    the canary's scaled contribution (so an inclusion adds 1 in expectation)."""

    def setup_canaries(self, canaries: DiracCanaries, included: torch.Tensor,
                       generator: torch.Generator) -> None:
        if included.dtype != torch.bool or included.shape != (canaries.count,):
            raise ValueError(f"included must be bools of shape ({canaries.count},); got "
                             f"{included.dtype} {tuple(included.shape)}")
        params = self.params  # type: ignore[attr-defined]
        c = self.max_grad_norm  # type: ignore[attr-defined]
        norms = [float(x) for x in c] if isinstance(c, list) else [float(c)] * len(params)
        self.canaries = canaries
        self.canary_included = included.clone()
        self.canary_generator = generator
        self.canary_norm = torch.tensor(norms, dtype=torch.float64)[canaries.param_index]
        self.canary_observations: list[torch.Tensor] = []
        self.canary_joined = torch.zeros(canaries.count, dtype=torch.int64)
        self.step_hooks.append(DiracCanaryMixin._observe)  # type: ignore[attr-defined]

    def clip_and_accumulate(self) -> None:
        super().clip_and_accumulate()  # type: ignore[misc]
        if self._skip_next:  # type: ignore[attr-defined]  # a physical chunk: sample once per logical step
            return
        q = self.sample_rate  # type: ignore[attr-defined]
        joins = (torch.rand(self.canaries.count, generator=self.canary_generator) < q) & self.canary_included
        idx = joins.nonzero().flatten()
        if idx.numel() == 0:
            return
        self.canary_joined[idx] += 1
        summed = self._summed  # type: ignore[attr-defined]
        for k, p in enumerate(self.params):  # type: ignore[attr-defined]
            sel = idx[self.canaries.param_index[idx] == k]
            if sel.numel() == 0:
                continue
            summed[p] = summed[p].contiguous() if p in summed else torch.zeros_like(p, dtype=sum_dtype(p))
            flat = summed[p].view(-1)
            flat.index_add_(0, self.canaries.flat_index[sel], self.canary_norm[sel].to(flat.dtype))
        self._samples += int(idx.numel())  # type: ignore[attr-defined]

    @staticmethod
    def _observe(opt) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in opt.params]
        scale = opt.expected_batch_size / opt.canary_norm
        opt.canary_observations.append(opt.canaries.gather(grads) * scale)


def poisson_gaussian_llr(observations: torch.Tensor, sample_rate: float, noise: torch.Tensor) -> torch.Tensor:
    """Per canary, the log-likelihood ratio of "included" vs "not" from its per-step
    observations z_t (T, m) in units of its contribution: each step z_t ~ N(b, s^2) without it
    and the mixture (1 - q) N(b, s^2) + q N(b + 1, s^2) with it (b = 0 ignoring the real data's
    gradient on that coordinate). Sum over t of log(1 - q + q exp((z_t - 1/2) / s^2)): the
    Neyman–Pearson statistic of a Poisson-sampled Gaussian step. ``noise``: s per canary."""
    s2 = (noise.double() ** 2).clamp_min(1e-300)
    a = torch.full_like(observations, math.log1p(-sample_rate))
    b = math.log(sample_rate) + (observations - 0.5) / s2
    return torch.logaddexp(a, b).sum(0)
