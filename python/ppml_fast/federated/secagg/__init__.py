"""Secure aggregation: the server learns the sum of the clients' updates and nothing else about
any one of them (Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine
Learning", CCS 2017; SecAgg+'s sparse neighbour graph from Bell et al., CCS 2020).

- :class:`Quantizer`, :func:`max_bits` — updates encoded in Z_{2^32} with stochastic rounding;
- :class:`SecAggParams`, :class:`SecAggClient`, :class:`SecAggServer` — the double-masking
  protocol (X25519 key agreement, HKDF-SHA256, Shamir sharing over GF(2^521 - 1), masks
  expanded by the native ChaCha20 kernel ``torch.ops.ppml_fast.secagg_mask_``);
- :class:`SecAggRound`, :func:`secure_sum` — a round for simulated clients in one process;
- :class:`SecAggFedAvg` — a strategy (``run_simulation``) whose aggregate goes through the
  protocol, alone or around DP-FedAvg (central noise on the unmasked sum);
- :func:`design` — a round's graph degree and threshold from the expected dropout rate and a
  target failure probability (Bell et al. 2020);
- :class:`SecAggError` — a round that cannot finish safely (too many dropouts, bad messages);
  :class:`SecAggAborted` — one the strategy gave up, which ``run_simulation`` records as skipped.

Needs the ``cryptography`` package (``pip install 'ppml_fast[secagg]'``); importing this module
works without it, and the first protocol object created raises an ImportError naming the extra.
"""

from .client import SecAggClient
from .design import SecAggDesign, design
from .errors import SecAggAborted, SecAggError
from .graph import complete_graph, harary_graph
from .messages import PublicKeys, UnmaskResponse
from .params import SecAggParams, default_threshold
from .quantize import Quantizer, max_bits
from .server import SecAggResult, SecAggServer
from .simulate import SecAggRound, secure_sum
from .strategy import SecAggFedAvg

__all__ = [
    "PublicKeys", "Quantizer", "SecAggAborted", "SecAggClient", "SecAggDesign", "SecAggError",
    "SecAggParams", "SecAggResult", "SecAggFedAvg", "SecAggRound", "SecAggServer", "UnmaskResponse", "complete_graph", "default_threshold",
    "design", "harary_graph", "max_bits", "secure_sum",
]
