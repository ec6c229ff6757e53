"""Fixed-point encoding of float updates in the ring Z_{2^32}, where the masks live.

Bonawitz et al. (CCS 2017) sum vectors of integers modulo R; real updates are first encoded as
such. Here a value is clipped to [-r, r], mapped affinely onto [0, 2^b - 1] and rounded
stochastically: ``q = floor(y + u)``, u ~ U[0, 1), with ``y = (x + r) * (2^b - 1) / (2r)``; q
rounds y up with probability y - floor(y), so ``E[q] = y`` (unbiased; stochastic rounding as in
Suresh et al., "Distributed mean estimation with limited communication", ICML 2017). Each q is
in [0, 2^b - 1], so the sum of K encodings is at most K (2^b - 1): it does not wrap around 2^32
as long as

    K * 2^b <= 2^32,      i.e.  b <= 32 - ceil(log2 K)

(:func:`max_bits`), and then the ring sum *is* the integer sum and decodes exactly to
``sum_k y_k / scale - K r`` up to the rounding. Error bound per coordinate of a sum of K
unclipped values: ``|decoded - sum_k x_k| < K / scale = K * 2r / (2^b - 1)`` (each rounding moves
less than one step; the errors are independent with mean 0 and variance <= 1/4 step^2, so the
typical error is sqrt(K)/2 steps).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from ppml_fast.ops.secagg import secagg_mask_

__all__ = ["Quantizer", "max_bits"]

_RING = 1 << 32
_INT32_MIN = -(1 << 31)


def max_bits(num_clients: int) -> int:
    """The largest b with ``num_clients * 2^b <= 2^32``: the sum of that many b-bit encodings
    cannot wrap."""
    if isinstance(num_clients, bool) or not isinstance(num_clients, numbers.Integral) or num_clients < 1:
        raise ValueError(f"num_clients must be an int >= 1; got {num_clients!r}")
    if num_clients > 1 << 31:
        raise ValueError(f"num_clients must be <= 2^31 (at least 1 bit per value); got {num_clients}")
    return 32 - math.ceil(math.log2(num_clients)) if num_clients > 1 else 32


@dataclass(frozen=True)
class Quantizer:
    """Encoding of [-clip_range, clip_range] on ``bits`` bits of Z_{2^32} (see the module doc).

    Attributes:
        clip_range: r > 0; values outside [-r, r] are clipped (for DP-FedAvg updates clipped to
            L2 norm C, r = C clips nothing, since every coordinate is at most C).
        bits: b in [1, 32]; use :func:`max_bits` of the number of clients.
    """

    clip_range: float
    bits: int

    def __post_init__(self) -> None:
        r = self.clip_range
        if isinstance(r, bool) or not isinstance(r, numbers.Real) or not math.isfinite(r) or r <= 0:
            raise ValueError(f"clip_range must be a finite number > 0; got {r!r}")
        b = self.bits
        if isinstance(b, bool) or not isinstance(b, numbers.Integral) or not 1 <= b <= 32:
            raise ValueError(f"bits must be an int in [1, 32]; got {b!r}")
        object.__setattr__(self, "clip_range", float(r))
        object.__setattr__(self, "bits", int(b))

    @property
    def levels(self) -> int:
        """Largest code, 2^b - 1."""
        return (1 << self.bits) - 1

    @property
    def scale(self) -> float:
        """Codes per unit: (2^b - 1) / (2r)."""
        return self.levels / (2.0 * self.clip_range)

    def max_clients(self) -> int:
        """The most encodings whose sum cannot wrap: floor((2^32 - 1) / (2^b - 1))."""
        return (_RING - 1) // self.levels

    def error_bound(self, num_clients: int) -> float:
        """Bound on |decoded sum - true sum| per coordinate for ``num_clients`` values in range:
        ``num_clients / scale``."""
        return num_clients / self.scale

    def quantize(self, x: torch.Tensor, *, seed: bytes, factor: float = 1.0) -> torch.Tensor:
        """Codes of ``factor * clip(x, -r, r)`` as an int32 tensor (bit pattern of the uint32
        code), stochastically rounded with uniforms from the ChaCha20 stream of ``seed``
        (32 bytes; the native ``secagg_mask_`` kernel on zeros: 32-bit words, many threads,
        several times faster than torch's generator).

        ``factor`` in [0, 1] scales after clipping, so the value stays in range (a client's
        weight relative to the largest allowed weight). The rounding is unbiased up to the
        resolution of the uniforms (2^-32) and of float64 near 2^b (2^(b - 53)), in steps.
        """
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating torch.Tensor; got {type(x).__name__}"
                            + (f" of dtype {x.dtype}" if isinstance(x, torch.Tensor) else ""))
        if not bool(torch.isfinite(x).all()):
            raise ValueError("x must be finite (a NaN or Inf cannot be encoded)")
        if isinstance(factor, bool) or not isinstance(factor, numbers.Real) or not 0 <= factor <= 1:
            raise ValueError(f"factor must be a number in [0, 1]; got {factor!r}")
        if not isinstance(seed, (bytes, bytearray)) or len(seed) != 32:
            raise ValueError(f"seed must be 32 bytes (a ChaCha20 key); got {type(seed).__name__}")
        r = self.clip_range
        y = x.detach().to(device="cpu", dtype=torch.float64).reshape(-1).clamp(-r, r)
        # y + 1/2, with y = (factor x + r) * scale in [0, 2^b - 1]
        y.mul_(float(factor) * self.scale).add_(r * self.scale + 0.5)
        # + w / 2^32, w uniform on [-2^31, 2^31): y + u with u uniform on [0, 1). floor(y + u)
        # rounds y up with probability y - floor(y), so its mean is y.
        words = secagg_mask_(torch.zeros(y.numel(), dtype=torch.int32), [bytes(seed)], [1])
        y.add_(words.to(torch.float64), alpha=2.0**-32).floor_()
        y.clamp_(0.0, float(self.levels))  # y + u may round up to 2^b when y = 2^b - 1
        # the uint32 code as int32 bits: code - 2^31 fits int32 exactly; flipping the top bit
        # adds 2^31 back modulo 2^32
        return y.sub_(float(1 << 31)).to(torch.int32).bitwise_xor_(_INT32_MIN)

    def dequantize(self, total: torch.Tensor, count: int) -> torch.Tensor:
        """The float64 sum of ``count`` decoded values from the ring sum of their codes:
        ``total / scale - count * r`` (codes are ``(factor x + r) * scale``, so the offset is
        ``count * r`` whatever the factors).

        Args:
            total: the ring sum as int32 bit patterns, uint32, or int64 values in [0, 2^32).
            count: how many encodings were summed (at most :meth:`max_clients`).
        """
        if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 0:
            raise ValueError(f"count must be an int >= 0; got {count!r}")
        if count > self.max_clients():
            raise ValueError(f"count must be <= {self.max_clients()} for {self.bits}-bit codes "
                             f"(else the ring sum may have wrapped); got {count}")
        if not isinstance(total, torch.Tensor) or total.dtype not in (torch.int32, torch.uint32, torch.int64):
            raise TypeError("total must be an int32, uint32 or int64 tensor; got "
                            + (str(total.dtype) if isinstance(total, torch.Tensor) else type(total).__name__))
        if total.dtype == torch.uint32:
            total = total.view(torch.int32)
        values = total.to(torch.int64) & (_RING - 1)
        return values.to(torch.float64) / self.scale - count * self.clip_range
