"""A Flower strategy with FedAvg semantics whose aggregation runs on ppml_fast's native op.

:class:`NativeFedAvg` is ``flwr.server.strategy.FedAvg`` with ``aggregate_fit`` replaced: the
clients' parameters are read in place from Flower's serialized bytes (read-only numpy views, no
per-client copy) and averaged, weighted by ``num_examples``, by
:func:`ppml_fast.ops.weighted_aggregate`, one call per layer over all clients (no Python loop
over clients in the arithmetic). Client sampling, configuration, evaluation, metrics
aggregation and failure handling are FedAvg's. Use it wherever a ``FedAvg`` goes::

    from ppml_fast.integrations.flower import NativeFedAvg
    strategy = NativeFedAvg(fraction_fit=1.0, min_fit_clients=10, min_available_clients=10)

Optional central DP (``clip_norm``, ``noise_multiplier``): the semantics of Flower's
``DifferentialPrivacyServerSideFixedClipping`` around FedAvg, fused into the same op call — see
:class:`NativeFedAvg`.

Differences from Flower 1.42: integer layers are averaged as float64 (FedAvg's default in-place
path multiplies them by their weight cast to an integer — 0 unless one client holds all the
examples — and returns zeros; its ``inplace=False`` path returns float64 like this one);
``num_examples`` that are negative or all zero raise ``ValueError`` (Flower divides by zero);
clients whose layers differ in number or shape raise ``ValueError`` naming the client; in DP mode
0-d layers are clipped with the others (Flower's ``compute_clip_model_update`` leaves them
unclipped: ``np.subtract`` returns a numpy scalar there, which ``*=`` rebinds instead of scaling).

Flower's current Message API (``ServerApp`` / ``ClientApp`` / ``strategy.start``) is served by
:class:`FedAvg` (:mod:`.flower_message`), :class:`DPFedAvg` (:mod:`.flower_dp`) and
:func:`dp_train` (:mod:`.flower_client`), re-exported here; :class:`NativeFedAvg` is the legacy API.

Needs Flower: ``pip install 'ppml_fast[flower]'``.
"""

from __future__ import annotations

import functools
import io
import math
import numbers
import os
import warnings
from logging import WARNING
from typing import Optional

import numpy as np

try:
    from flwr.common import (
        FitIns,
        FitRes,
        NDArrays,
        Parameters,
        Scalar,
        bytes_to_ndarray,
        ndarrays_to_parameters,
        parameters_to_ndarrays,
    )
    from flwr.common.logger import log
    from flwr.server.client_manager import ClientManager
    from flwr.server.client_proxy import ClientProxy
    from flwr.server.strategy import FedAvg
except ImportError as exc:  # flwr is an optional dependency
    raise ImportError(
        "ppml_fast.integrations.flower needs Flower (flwr 1.x); install it with "
        f"pip install 'ppml_fast[flower]' (import failed: {exc})"
    ) from exc

from ppml_fast.integrations._ndarrays import aggregate_ndarrays, check_layout
from ppml_fast.ops import noise_blocks

__all__ = ["NativeFedAvg", "FedAvg", "DPFedAvg", "dp_train"]


_NPY_MAGIC = b"\x93NUMPY"


@functools.lru_cache(maxsize=1024)
def _npy_header(prefix: bytes) -> Optional[tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) of a .npy header (magic, version, length and header dict), or None when
    the array must go through ``np.load`` (Fortran order, object dtype). Cached: every client
    sends the same headers, and parsing one (``ast.literal_eval``) costs more than the view."""
    f = io.BytesIO(prefix)
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    if fortran or dtype.hasobject:
        return None
    return tuple(shape), dtype


def _npy_view(buf: bytes) -> np.ndarray:
    """The array in ``buf`` (Flower's ``ndarray_to_bytes``: the .npy format), read in place: a
    read-only view of the bytes, not a copy (``np.load`` would copy every client's model). Other
    .npy variants (format 3.0, Fortran order, object dtypes) go through Flower's own loader."""
    if len(buf) < 12 or bytes(buf[:6]) != _NPY_MAGIC or buf[6] not in (1, 2):
        return bytes_to_ndarray(buf)
    start = 10 if buf[6] == 1 else 12
    end = start + int.from_bytes(buf[8:start], "little")
    try:
        parsed = _npy_header(bytes(buf[:end]))
    except ValueError:
        return bytes_to_ndarray(buf)
    if parsed is None:
        return bytes_to_ndarray(buf)
    shape, dtype = parsed
    return np.frombuffer(buf, dtype=dtype, count=math.prod(shape), offset=end).reshape(shape)


def _arrays_of(parameters: Parameters) -> NDArrays:
    if parameters.tensor_type != "numpy.ndarray":
        return parameters_to_ndarrays(parameters)
    return [_npy_view(t) for t in parameters.tensors]


def _num_examples(results: list[tuple[ClientProxy, FitRes]]) -> list[int]:
    weights = []
    for i, (_, res) in enumerate(results):
        n = res.num_examples
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
            raise ValueError(f"results[{i}] FitRes.num_examples must be an int >= 0; got {n!r}")
        weights.append(int(n))
    if sum(weights) == 0:
        raise ValueError("FitRes.num_examples must not be 0 for every client (FedAvg divides by their sum)")
    return weights


class NativeFedAvg(FedAvg):
    """Flower's FedAvg with its weighted mean computed by ``ppml_fast.ops.weighted_aggregate``.

    Args:
        clip_norm: when set (> 0), central DP as in Flower's
            ``DifferentialPrivacyServerSideFixedClipping``: each client's update (its parameters
            minus the round's global parameters) is scaled by ``min(1, clip_norm / ||update||)``,
            ``||.||`` the L2 norm over all layers together, and the new global parameters are
            ``global + mean of the clipped updates`` — an **unweighted** mean over the K results,
            because a weighted mean's sensitivity would depend on the clients' reported
            ``num_examples`` (Flower's wrapper keeps FedAvg's weights, which bounds the
            sensitivity only when all clients report the same count).
        noise_multiplier: z >= 0 (needs ``clip_norm``): Gaussian noise of std ``z * clip_norm / K``
            is added to each coordinate of the mean, i.e. std ``z * clip_norm`` on the sum of the
            clipped updates (McMahan et al., "Learning differentially private recurrent language
            models", ICLR 2018, Algorithm 1; Flower's ``compute_stdv``). K, the number of clients
            in the round, is treated as public. In DP mode a round with any failure is skipped
            (returns no parameters), as Flower's wrapper does, whatever ``accept_failures`` says.
            This strategy does no accounting. Flower samples exactly m of the n clients without
            replacement, so per round compose
            ``SampledWithoutReplacementEvent(n, m, GaussianEvent(z / 2))`` with
            :mod:`ppml_fast.accounting` (substitution adjacency: replacing one client moves the
            sum by up to ``2 * clip_norm``, hence ``z / 2``; see that event's docstring).
        noise_seed: the Philox key of the noise (None: drawn from ``os.urandom``); the stream
            offset advances after every noisy round, so no two rounds share noise.
        **kwargs: FedAvg's arguments (``fraction_fit``, ``min_fit_clients``,
            ``fit_metrics_aggregation_fn``, ``accept_failures``, ``initial_parameters``, ...).
            ``inplace`` is accepted and has no effect: the clients' arrays are never modified.
    """

    def __init__(
        self,
        *,
        clip_norm: Optional[float] = None,
        noise_multiplier: float = 0.0,
        noise_seed: Optional[int] = None,
        **kwargs,
    ) -> None:
        if clip_norm is not None:
            if isinstance(clip_norm, bool) or not isinstance(clip_norm, numbers.Real) \
                    or not (math.isfinite(clip_norm) and clip_norm > 0):
                raise ValueError(f"clip_norm must be None or a finite number > 0; got {clip_norm!r}")
            clip_norm = float(clip_norm)
        if isinstance(noise_multiplier, bool) or not isinstance(noise_multiplier, numbers.Real) \
                or not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
            raise ValueError(f"noise_multiplier must be a finite number >= 0; got {noise_multiplier!r}")
        if noise_multiplier > 0 and clip_norm is None:
            raise ValueError(
                f"noise_multiplier={noise_multiplier!r} needs clip_norm (the noise is calibrated to it); "
                "got clip_norm=None"
            )
        if noise_seed is None:
            noise_seed = int.from_bytes(os.urandom(8), "little")
        if isinstance(noise_seed, bool) or not isinstance(noise_seed, numbers.Integral) \
                or not 0 <= noise_seed < 2**64:
            raise ValueError(f"noise_seed must be None or an int in [0, 2**64); got {noise_seed!r}")
        super().__init__(**kwargs)
        self.clip_norm = clip_norm
        self.noise_multiplier = float(noise_multiplier)
        self.noise_seed = int(noise_seed)
        self.noise_offset = 0
        self._round_parameters: Optional[tuple[int, NDArrays]] = None

    def __repr__(self) -> str:
        rep = f"NativeFedAvg(accept_failures={self.accept_failures}"
        if self.clip_norm is not None:
            rep += f", clip_norm={self.clip_norm}, noise_multiplier={self.noise_multiplier}"
        return rep + ")"

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """FedAvg's; in DP mode it also keeps the round's global parameters (updates are taken
        against them)."""
        if self.clip_norm is not None:
            self._round_parameters = (server_round, parameters_to_ndarrays(parameters))
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Optional[Parameters], dict[str, Scalar]]:
        """Weighted average of the results (FedAvg), computed natively."""
        if not results:
            return None, {}
        if failures and (not self.accept_failures or self.clip_norm is not None):
            return None, {}
        clients = [_arrays_of(res.parameters) for _, res in results]
        check_layout(clients, name="results")
        with warnings.catch_warnings():  # torch.from_numpy on the read-only views; nothing writes
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            if self.clip_norm is None:
                aggregated = aggregate_ndarrays(clients, _num_examples(results))
            else:
                aggregated = self._aggregate_dp(server_round, clients)
        parameters_aggregated = ndarrays_to_parameters(aggregated)

        metrics_aggregated: dict[str, Scalar] = {}
        if self.fit_metrics_aggregation_fn:
            fit_metrics = [(res.num_examples, res.metrics) for _, res in results]
            metrics_aggregated = self.fit_metrics_aggregation_fn(fit_metrics)
        elif server_round == 1:  # FedAvg logs this once
            log(WARNING, "No fit_metrics_aggregation_fn provided")
        return parameters_aggregated, metrics_aggregated

    def _aggregate_dp(self, server_round: int, clients: list[NDArrays]) -> NDArrays:
        if self._round_parameters is None or self._round_parameters[0] != server_round:
            held = None if self._round_parameters is None else self._round_parameters[0]
            raise ValueError(
                f"clip_norm needs round {server_round}'s global parameters, which configure_fit "
                f"keeps; configure_fit last ran for round {held}"
            )
        reference = self._round_parameters[1]
        k = len(clients)
        std = self.noise_multiplier * self.clip_norm / k  # McMahan et al. 2018, Alg. 1: z C / K
        aggregated = aggregate_ndarrays(
            clients, [1.0] * k, reference=reference, clip_norm=self.clip_norm, noise_std=std,
            seed=self.noise_seed, offset=self.noise_offset,
        )
        if std > 0:
            self.noise_offset += noise_blocks(sum(int(a.size) for a in reference))
        return aggregated


# Flower's Message API (flwr >= 1.21: ServerApp / ClientApp / strategy.start): imported last, so
# this module's legacy names are defined first (NativeFedAvg subclasses the legacy FedAvg).
from ppml_fast.integrations.flower_message import FedAvg  # noqa: E402
from ppml_fast.integrations.flower_dp import DPFedAvg  # noqa: E402
from ppml_fast.integrations.flower_client import dp_train  # noqa: E402
