"""The LSTM's two sequential loops in the C++ core (``csrc/cpu/lstm_bptt.cpp``): the cell states
of the DP forward's recomputation and backpropagation through time writing every step's gate
gradients (:mod:`ppml_fast.privacy.recurrent_layer`, which keeps the torch loops for the cases
these do not take: CUDA tensors, 16-bit dtypes, a projected LSTM, ``ENABLED = False``).

Same formulas as the torch loops, step for step (the kernel's header comment); the rounding
differs only in the order of the recurrent product's sum (over k in order, against the BLAS's
blocking), as between any two BLAS builds. The per-sample norms and the clipped sums read the same
gate gradients, whichever loop wrote them, so a record's clipped contribution has the norm the
factor was computed from (privacy does not rest on these values being the torch loop's bits).

Measured (issue 16, 2-core AMD EPYC, torch 2.13, the models bench's LSTM, B 16, T 32, H 64):
see bench/RESULTS.md ("LSTM loops in C++").
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ppml_fast.ops._native import DTYPE_TAGS, _C

# Kill switch (and the A/B's toggle): False runs the torch loops.
ENABLED = True
# Whether the unprojected LSTM's forward runs here too (else: torch's native op, then the gates
# recomputed by one matmul and the cell states by lstm_cells).
FORWARD = True

_DTYPES = (torch.float32, torch.float64)


def usable(*tensors: Optional[Tensor]) -> bool:
    """Whether the kernels take these tensors: on, all on the CPU, one dtype (float32/64)."""
    if not ENABLED or not hasattr(_C, "lstm_bptt"):
        return False
    first = tensors[0]
    return first.dtype in _DTYPES and all(
        t is None or (t.device.type == "cpu" and t.dtype == first.dtype) for t in tensors)


def _plain(t: Optional[Tensor]) -> Optional[Tensor]:
    """``t`` contiguous with its lazy negation / conjugation applied (``data_ptr()`` of such a
    view points at the stored, un-negated values: review S8)."""
    return None if t is None else t.resolve_conj().resolve_neg().contiguous()


def _check(name: str, expected: dict, tensors: dict) -> None:
    """Every tensor on the CPU, in the first one's dtype (float32 / float64), of its expected
    shape: the kernels read raw buffers, so nothing else may reach them (review S8)."""
    first = next(iter(tensors.values()))
    for key, t in tensors.items():
        if t is None:
            continue
        if t.device.type != "cpu" or t.dtype != first.dtype or first.dtype not in _DTYPES:
            raise ValueError(
                f"recurrent_native.{name}: {key} must be a CPU float32/float64 tensor of "
                f"{first.dtype}; got {t.dtype} on {t.device}")
        if tuple(t.shape) != tuple(expected[key]):
            raise ValueError(f"recurrent_native.{name}: {key} must have shape "
                             f"{tuple(expected[key])}; got {tuple(t.shape)}")


def cells(ig: Tensor, f: Tensor, c0: Tensor, c: Tensor) -> None:
    """``c[t] = ig[t] + f[t] * c[t-1]`` (``c[-1]`` = ``c0``) into ``c`` (T, B, H), contiguous;
    ``ig`` (T, B, H) contiguous, ``f`` (T, B, H) with unit stride in H and rows of one stride
    (the forget gate's slice of the (T, B, 4H) gates), ``c0`` (B, H)."""
    steps, batch, hidden = c.shape
    _check("cells", {"c": (steps, batch, hidden), "ig": (steps, batch, hidden),
                     "f": (steps, batch, hidden), "c0": (batch, hidden)},
           {"c": c, "ig": ig, "f": f, "c0": c0})
    c0 = _plain(c0)
    if ig.is_neg() or f.is_neg() or c.is_neg():
        raise ValueError("recurrent_native.cells: ig, f and c must not be lazily negated views")
    if not (ig.is_contiguous() and c.is_contiguous() and f.stride(2) == 1
            and f.stride(0) == batch * f.stride(1) and f.stride(1) >= hidden):
        raise ValueError("recurrent_native.cells: ig and c must be contiguous and f (T, B, H) "
                         "rows of one stride >= H with unit stride in H")
    _C.lstm_cells(DTYPE_TAGS[c.dtype], steps, batch, hidden, ig.data_ptr(), f.data_ptr(),
                  f.stride(1), c0.data_ptr(), c.data_ptr())


def bptt(gh: Tensor, p4: Tensor, po: Tensor, dc_dm: Tensor, w_hh: Tensor,
         gcn: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """One direction's backpropagation through time (no projection): ``(buf (T, B, 5, H),
    dL/dh_0 (B, H), dL/dc_0 (B, H))``, ``buf[:, :, 1:]`` the gate gradients (``recurrent_layer``'s
    layout). ``gh`` (T, B, H) dL/dh_t from above (h_n's gradient already added to the last
    step), ``p4`` (T, B, 4, H), ``po`` and ``dc_dm`` (T, B, H), ``w_hh`` (4H, H), ``gcn`` (B, H)
    or None."""
    steps, batch, hidden = gh.shape
    _check("bptt", {"gh": (steps, batch, hidden), "p4": (steps, batch, 4, hidden),
                    "po": (steps, batch, hidden), "dc_dm": (steps, batch, hidden),
                    "w_hh": (4 * hidden, hidden), "gcn": (batch, hidden)},
           {"gh": gh, "p4": p4, "po": po, "dc_dm": dc_dm, "w_hh": w_hh, "gcn": gcn})
    gh, p4, po, dc_dm, w_hh, gcn = (_plain(t) for t in (gh, p4, po, dc_dm, w_hh, gcn))
    buf = gh.new_empty(steps, batch, 5, hidden)
    dh0 = gh.new_empty(batch, hidden)
    dc0 = gh.new_empty(batch, hidden)
    _C.lstm_bptt(DTYPE_TAGS[gh.dtype], steps, batch, hidden, gh.data_ptr(), p4.data_ptr(),
                 po.data_ptr(), dc_dm.data_ptr(), w_hh.data_ptr(),
                 0 if gcn is None else gcn.data_ptr(), buf.data_ptr(), dh0.data_ptr(), dc0.data_ptr())
    return buf, dh0, dc0


def forward(x: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor],
            h0: Tensor, c0: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor]]:
    """One direction's forward (no projection) on ``x`` (T, B, d), time-major in the direction's
    own order: ``(h (T, B, H), c (T, B, H), (p4, po, dc_dm))``, the factors of
    ``recurrent_layer._backward``. The input projection of all steps is one torch matmul; the
    recurrence, the gates (sigmoid and tanh from a vectorised float32 exp, a few ulp from
    libm's; tanh by its Taylor series below |x| = 1/4, for relative accuracy at small
    activations) and the factors run in the C++ loop."""
    steps, batch, din = x.shape
    hidden = w_hh.shape[1]
    _check("forward", {"x": (steps, batch, din), "w_ih": (4 * hidden, din), "w_hh": (4 * hidden, hidden),
                       "b_ih": (4 * hidden,), "b_hh": (4 * hidden,), "h0": (batch, hidden),
                       "c0": (batch, hidden)},
           {"x": x, "w_ih": w_ih, "w_hh": w_hh, "b_ih": b_ih, "b_hh": b_hh, "h0": h0, "c0": c0})
    if (b_ih is None) != (b_hh is None):
        raise ValueError("recurrent_native.forward: b_ih and b_hh must both be given or both None")
    flat = x.reshape(steps * batch, x.shape[-1])
    # autocast off: under torch.autocast the matmul would give a 16-bit buffer that the kernel
    # reads and writes as x's dtype (heap corruption, review S8); checked again below
    with torch.autocast(device_type=x.device.type, enabled=False):
        if b_ih is not None:
            pre = torch.addmm(b_ih + b_hh, flat, w_ih.t())
        else:
            pre = flat @ w_ih.t()
    pre = _plain(pre)
    _check("forward", {"pre": (steps * batch, 4 * hidden), "x": (steps, batch, din)}, {"pre": pre, "x": x})
    w_t = _plain(w_hh.t())
    h0, c0 = _plain(h0), _plain(c0)
    h = x.new_empty(steps, batch, hidden)
    c = x.new_empty(steps, batch, hidden)
    p4 = x.new_empty(steps, batch, 4, hidden)
    po = x.new_empty(steps, batch, hidden)
    dc_dm = x.new_empty(steps, batch, hidden)
    _C.lstm_forward(DTYPE_TAGS[x.dtype], steps, batch, hidden, pre.data_ptr(), w_t.data_ptr(),
                    h0.data_ptr(), c0.data_ptr(), h.data_ptr(), c.data_ptr(), p4.data_ptr(),
                    po.data_ptr(), dc_dm.data_ptr())
    return h, c, (p4, po, dc_dm)
