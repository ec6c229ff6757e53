"""Weighted mean of per-client lists of numpy layers (a Flower server's ``NDArrays``) on the native
``weighted_aggregate`` op. A plain weighted mean runs one op call per layer, reading the clients'
arrays where they lie; with clipping (whose norm spans all layers) the layers are packed into one
(K, P) matrix first and one op call clips, averages and adds noise.

No Flower import here, so the packing is usable (and testable) without ``flwr``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ppml_fast.ops import weighted_aggregate

_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def _work_dtype(layers: Sequence[np.ndarray]) -> np.dtype:
    """The dtype the flat vectors are packed in: the layers' common floating type, float64 when
    any layer is not floating (integers are averaged as floats, as Flower's ``aggregate`` does)."""
    if not layers:
        return np.dtype(np.float32)
    dt = np.result_type(*[a.dtype for a in layers])
    return dt if dt in _FLOATS else np.dtype(np.float64)


def _out_dtype(layer: np.ndarray) -> np.dtype:
    return layer.dtype if layer.dtype in _FLOATS else np.dtype(np.float64)


def check_layout(clients: Sequence[Sequence[np.ndarray]], name: str = "clients") -> None:
    """Every client holds as many layers as ``clients[0]``, with the same shapes."""
    if len(clients) == 0:
        raise ValueError(f"{name} must not be empty")
    first = [np.shape(a) for a in clients[0]]
    for i, layers in enumerate(clients):
        shapes = [np.shape(a) for a in layers]
        if len(shapes) != len(first):
            raise ValueError(
                f"{name}[{i}] has {len(shapes)} layers; {name}[0] has {len(first)}"
            )
        for j, (s, s0) in enumerate(zip(shapes, first)):
            if s != s0:
                raise ValueError(
                    f"{name}[{i}] layer {j} has shape {s}; {name}[0] layer {j} has shape {s0}"
                )


def pack(layers: Sequence[np.ndarray], dtype: np.dtype) -> np.ndarray:
    """One client's layers as one flat, contiguous vector of ``dtype``."""
    return np.concatenate([np.asarray(a).astype(dtype, copy=False).reshape(-1) for a in layers])


def unpack(flat: np.ndarray, like: Sequence[np.ndarray]) -> list[np.ndarray]:
    """``flat`` cut into arrays shaped like ``like``, each in its layer's floating dtype (float64
    for non-floating layers)."""
    out = []
    start = 0
    for a in like:
        size = int(np.size(a))
        out.append(flat[start:start + size].reshape(np.shape(a)).astype(_out_dtype(a)))
        start += size
    return out


def _per_layer(clients: Sequence[Sequence[np.ndarray]], weights: np.ndarray) -> list[np.ndarray]:
    """Plain weighted mean, one op call per layer on the clients' own buffers (no packing copy:
    Flower's arrays are read where they lie)."""
    out = []
    for j, first in enumerate(clients[0]):
        rows = [np.asarray(c[j]) for c in clients]
        dtype = np.result_type(*{r.dtype for r in rows})
        if dtype not in _FLOATS:
            dtype = np.dtype(np.float64)
        rows = [r.astype(dtype, copy=False).reshape(-1) for r in rows]
        mean, _ = weighted_aggregate(rows, weights)
        out.append(mean.reshape(np.shape(first)).astype(_out_dtype(first), copy=False))
    return out


def _packed(
    clients: Sequence[Sequence[np.ndarray]],
    weights: np.ndarray,
    reference: Optional[Sequence[np.ndarray]],
    **op_kwargs,
) -> list[np.ndarray]:
    """Clipping needs the norm over all layers: the clients' layers are copied once into one
    (K, P) matrix (minus the reference), and one op call clips, averages and adds noise."""
    like = list(clients[0])
    dtype = _work_dtype(like if reference is None else like + list(reference))
    sizes = [int(np.size(a)) for a in like]
    bounds = np.cumsum([0] + sizes)
    matrix = np.empty((len(clients), int(bounds[-1])), dtype=dtype)
    for k, layers in enumerate(clients):
        for j, a in enumerate(layers):
            matrix[k, bounds[j]:bounds[j + 1]] = np.asarray(a).reshape(-1)
    base = None
    if reference is not None:
        base = pack(reference, dtype)
        matrix -= base
    mean, _ = weighted_aggregate(matrix, weights, **op_kwargs)
    if base is not None:
        mean = base + mean
    return unpack(mean, like)


def aggregate_ndarrays(
    clients: Sequence[Sequence[np.ndarray]],
    weights: Sequence[float],
    *,
    reference: Optional[Sequence[np.ndarray]] = None,
    clip_norm: Optional[float] = None,
    noise_std: float = 0.0,
    seed: Optional[int] = None,
    offset: int = 0,
) -> list[np.ndarray]:
    """Weighted mean of K clients' layers, layer by layer, on the native op.

    Without ``reference``, clipping and noise: one op call per layer on the clients' arrays as
    they are. Otherwise the layers are packed into one (K, P) matrix (one copy) and one op call
    does it all.

    Args:
        clients: K lists of numpy arrays, one list per client, all with the same shapes.
        weights: K non-negative weights, not all zero (e.g. examples per client).
        reference: when given (the round's global layers), the op averages the updates
            ``client - reference`` and the result is ``reference + mean update``; clipping then
            bounds each update's L2 norm over all layers together.
        clip_norm, noise_std, seed, offset: as in :func:`ppml_fast.ops.weighted_aggregate`
            (the noise is added to the mean, in the packing dtype).

    Returns:
        The mean, one array per layer, with the shapes of ``clients[0]`` and each layer's floating
        dtype (float64 for integer layers).
    """
    check_layout(clients)
    if reference is not None:
        check_layout([list(clients[0]), list(reference)], name="[clients[0], reference]")
    if len(clients[0]) == 0:
        return []
    w = np.asarray(weights, dtype=np.float64)
    if reference is None and clip_norm is None and noise_std == 0:
        return _per_layer(clients, w)
    return _packed(clients, w, reference, clip_norm=clip_norm, noise_std=noise_std, seed=seed,
                   offset=offset)
