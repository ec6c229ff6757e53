"""The straggler deadline (``run_simulation(client_timeout=...)``) for clients that train with
their own ``fit``: a fit that has not returned ``client_timeout`` seconds after it started is
abandoned and its client dropped with reason ``"timeout"``; the round goes on.

How, and what it costs. Python cannot kill a thread, so with a deadline each such fit runs in
a fresh daemon thread and the round waits for it with ``Thread.join(timeout)``. A fit that
misses the deadline keeps running in the background until it returns by itself (a fit that
never returns keeps one thread, its scratch model and what it allocated for the life of the
process; daemon threads do not keep the process alive at exit), and it competes for the CPU
with the rest of the run meanwhile. Per fit, the deadline costs one thread start, the hand-over
of the GIL and a join: measured here (2 shared cores, torch 2.13 CPU, the tests' 6-8-3 MLP,
200 fits of 20 examples) about 1 ms per fit, 0.26 -> 0.42 s and 0.34 -> 0.56 s for the 200
fits in two runs; nothing without a deadline (the fit then runs inline). A subprocess per fit
could be killed, but would pickle the client, its data and the model each time (tens to
hundreds of milliseconds per fit, more than the fits themselves in most simulations), so it
was not chosen. A fit stuck inside a C call that holds the GIL blocks the interpreter and
cannot be abandoned either way.

What an abandoned fit can still touch. Its result goes into a box that nobody reads once the
deadline passed, so it never enters a round; the scratch model it was lent is given up and the
next fit gets a fresh one (the abandoned fit may still write into the old one); while it runs,
its client is dropped again with reason ``"timeout"`` whenever it is picked (two fits must not
share the client's state). What it keeps changing is its own client's state, as a real device
that finished late would.

Privacy of a timed-out client (local DP). Its fit may have released nothing (its update is
discarded) but it has been running DP-SGD steps on its records and composing them into its own
accountant, and it may go on doing so after the deadline. The ε recorded for it is therefore
the conservative bound of :func:`~ppml_fast.federated.dp.local.state_after_lost_fit`: every
step of the fit composed onto the state it started from, as if the fit had completed; the true
spend, whenever the fit ends, is at most that. The bound is computed, at the timeout only,
from a copy of the client's state taken before the fit starts (the fit changes the state in
place; the copy is its accountant's event list, microseconds), and is also what a still-busy
client reports when it is picked again. A ``KeyboardInterrupt`` or ``SystemExit`` raised inside
a fit stops the run as it does without a deadline.
"""

from __future__ import annotations

import math
import threading
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from .client import Client, fit_settings
from .dp.local import LocalDP, LocalDPState, state_after_lost_fit
from .backends.base import Outcome, fit_one, make_model

__all__ = ["DeadlineRunner"]


class _Bound:
    """What a fit's conservative privacy bound needs, captured before the fit starts (the fit
    changes the client's state in place): a copy of the client's state (cheap: its
    accountant's event history) and the fit's settings. :meth:`epsilon` composes the bound
    (:func:`state_after_lost_fit`) only when it is needed, at a timeout."""

    def __init__(self, client: Client, config: Mapping[str, Any]) -> None:
        self.local_dp: Optional[LocalDP] = None
        local_dp = config.get("local_dp")
        if not isinstance(local_dp, LocalDP):
            return
        try:
            s = fit_settings(config)
        except Exception:  # the client refuses this config before any step: nothing to bound
            return
        self.local_dp, self.settings, self.num_examples = local_dp, s, client.num_examples
        self.state: Optional[LocalDPState] = None
        if client._local_dp is not None:
            self.state = LocalDPState(client._local_dp.accountant_name)
            self.state.load_state_dict(client._local_dp.state_dict())
        self._epsilon: Optional[float] = None
        self._done = False

    def epsilon(self) -> Optional[float]:
        """ε at ``local_dp.delta`` after every step of the fit (None: no DP step to count)."""
        if self.local_dp is None:
            return None
        if not self._done:
            self._done = True
            try:
                after = state_after_lost_fit(self.state, self.local_dp, self.num_examples,
                                             self.settings["batch_size"], self.settings["local_epochs"])
                self._epsilon = after.epsilon(self.local_dp.delta) if after.accountant.history else None
            except Exception:  # an unreadable bound: unknown spend, counted as unbounded
                self._epsilon = math.inf
        return self._epsilon


class DeadlineRunner:
    """Runs ``Client.fit`` with a scratch model of ``model_fn``, under a deadline when one is
    given (module docstring). One per backend; its scratch model is replaced after a fit is
    abandoned."""

    def __init__(self, model_fn: Callable[[], nn.Module]) -> None:
        self.model_fn = model_fn
        self._scratch: Optional[nn.Module] = None
        self._busy: dict[int, tuple[threading.Thread, _Bound]] = {}

    def scratch(self) -> nn.Module:
        if self._scratch is None:
            self._scratch = make_model(self.model_fn)
        return self._scratch

    def fit(self, client: Client, parameters: torch.Tensor, config: Mapping[str, Any],
            timeout: Optional[float]) -> Outcome:
        """``fit_one`` of ``client``; with ``timeout`` (seconds), an Outcome with ``seconds =
        inf`` (the simulation reads "timeout") and the conservative ε under local DP when the
        fit has not returned in time or the client's previous abandoned fit still runs."""
        if timeout is None:
            return fit_one(client, parameters, {**config, "model": self.scratch()})
        busy = self._busy.get(id(client))
        if busy is not None:
            if busy[0].is_alive():
                return Outcome(None, None, math.inf, epsilon=busy[1].epsilon())
            del self._busy[id(client)]
        bound = _Bound(client, config)
        box: list[Outcome] = []
        raised: list[BaseException] = []
        work = {**config, "model": self.scratch()}

        def run() -> None:
            try:
                box.append(fit_one(client, parameters, work))
            except BaseException as e:  # KeyboardInterrupt, SystemExit: fit_one lets them through
                raised.append(e)

        thread = threading.Thread(target=run, name=f"ppml-fit-{client.cid}", daemon=True)
        thread.start()
        thread.join(timeout)
        if not thread.is_alive():
            if raised:  # as without a deadline: such an exception stops the run
                raise raised[0]
            return box[0]
        # abandoned: its box is never read again, its scratch model is never lent again
        self._scratch = None
        self._busy[id(client)] = (thread, bound)
        return Outcome(None, None, math.inf, epsilon=bound.epsilon())
