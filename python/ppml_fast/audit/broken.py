"""Deliberately broken DP-SGD optimizers, for showing what an audit flags (``ppml-fast audit
--no-noise`` / ``--no-clip``) and for testing auditors. Never train with them: the accountant
still reports the epsilon of the noise multiplier and clipping norm it was given, which these
optimizers do not honour.
"""

from __future__ import annotations

from ppml_fast.privacy.optimizer import DPOptimizer

__all__ = ["BROKEN", "NoClipDPOptimizer", "NoNoiseDPOptimizer"]


class NoNoiseDPOptimizer(DPOptimizer):
    """Clips but adds no noise; the accountant still counts ``noise_multiplier``."""

    def add_noise(self, grads) -> None:
        pass


class NoClipDPOptimizer(DPOptimizer):
    """Adds the noise for clipping norm C but clips at 1e9 C (in effect: not at all), so one
    record moves the sum by its whole gradient, not at most C."""

    def clip_and_accumulate(self) -> None:
        c = self.max_grad_norm
        self.max_grad_norm = [x * 1e9 for x in c] if isinstance(c, list) else c * 1e9
        try:
            super().clip_and_accumulate()
        finally:
            self.max_grad_norm = c


#: what each ``ppml-fast audit`` flag breaks
BROKEN = {"noise": NoNoiseDPOptimizer, "clip": NoClipDPOptimizer}
