"""Tutorial "Accounting": events, the RDP and PLD accountants, calibration, and a ledger."""
import os
import tempfile

# --8<-- [start:accountants]
from ppml_fast.accounting import (GaussianEvent, PLDAccountant, PoissonSampledEvent,
                                  RDPAccountant)

# DP-SGD on MNIST: batch 256 of 60,000 (q = 256 / 60,000), sigma 1.1, 60 epochs of 235 steps
step = PoissonSampledEvent(256 / 60_000, GaussianEvent(1.1))
rdp = RDPAccountant().compose(step, 60 * 235)
pld = PLDAccountant().compose(step, 60 * 235)
print(f"RDP epsilon {rdp.get_epsilon(delta=1e-5):.3f}")    # an upper bound
print(f"PLD epsilon {pld.get_epsilon(delta=1e-5):.3f}")    # tight (numerical, rounded up)
# --8<-- [end:accountants]
eps_rdp, eps_pld = rdp.get_epsilon(delta=1e-5), pld.get_epsilon(delta=1e-5)
assert 0 < eps_pld < eps_rdp, (eps_pld, eps_rdp)

# --8<-- [start:calibration]
from ppml_fast.accounting import epsilon, get_noise_multiplier, get_steps

sigma = get_noise_multiplier(target_epsilon=3.0, target_delta=1e-5,
                             sample_rate=256 / 60_000, epochs=60)  # accountant="pld" by default
print(f"sigma for epsilon 3 over 60 epochs: {sigma:.3f}")
print(f"its epsilon: {epsilon(noise_multiplier=sigma, sample_rate=256 / 60_000, steps=60 * 235, delta=1e-5):.3f}")
steps = get_steps(target_epsilon=3.0, target_delta=1e-5, sample_rate=256 / 60_000,
                  noise_multiplier=1.1)
print(f"steps that sigma 1.1 affords within epsilon 3: {steps}")
# --8<-- [end:calibration]
assert 2.97 <= epsilon(noise_multiplier=sigma, sample_rate=256 / 60_000, steps=60 * 235, delta=1e-5) <= 3.0
assert steps > 60 * 235  # sigma 1.1 spent only 2.39 in 60 epochs
assert epsilon(noise_multiplier=1.1, sample_rate=256 / 60_000, steps=steps, delta=1e-5) <= 3.0

workdir = tempfile.mkdtemp()
os.chdir(workdir)
# --8<-- [start:ledger]
import torch

from ppml_fast.accounting import PrivacyBudgetExceeded, PrivacyLedger
from ppml_fast.mechanisms import gaussian_mechanism

ledger = PrivacyLedger("privacy.ledger")                  # a JSON-lines file, one per project
ledger.add_dataset("survey", epsilon_budget=1.0, delta=1e-6)
ages = torch.rand(1000) * 90                              # one value per person, in [0, 90]
mean, event = gaussian_mechanism(ages.mean(), sensitivity=90 / 1000, epsilon=0.5, delta=1e-6,
                                 ledger=ledger, dataset="survey", what="mean age")
print(f"released mean {float(mean):.2f}; spent {ledger.spent('survey'):.2f} of 1.0")
try:
    gaussian_mechanism(ages.mean(), sensitivity=90 / 1000, epsilon=0.8, delta=1e-6,
                       ledger=ledger, dataset="survey", what="mean age again")
except PrivacyBudgetExceeded as e:                        # refused before any noise was drawn
    print("refused:", e)
# --8<-- [end:ledger]
else:
    raise AssertionError("the ledger let a spend past the budget through")
