"""Tutorial "Auditing": empirical lower bounds on epsilon, and check_sensitivity on one's model."""
# --8<-- [start:audit]
from ppml_fast.audit import audit_digits
from ppml_fast.audit.broken import NoNoiseDPOptimizer   # a deliberately broken optimizer

honest = audit_digits(noise_multiplier=1.0, epochs=1, canaries=500, seed=0)
broken = audit_digits(noise_multiplier=1.0, epochs=1, canaries=500, seed=0,
                      dp_optimizer_class=NoNoiseDPOptimizer)
for name, result in [("honest", honest), ("no noise", broken)]:
    print(f"{name}: lower bound {result.epsilon_lower_bound:.2f}, "
          f"claimed {result.epsilon_claimed:.2f}, flagged={result.flagged}")
# --8<-- [end:audit]
assert not honest.flagged, honest
assert broken.flagged, broken

# --8<-- [start:sensitivity]
import torch
from torch import nn

from ppml_fast.audit import check_sensitivity

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
x, y = torch.randn(8, 16) * 5, torch.randint(0, 4, (8,))
report = check_sensitivity(model, nn.CrossEntropyLoss(), (x, y), max_grad_norm=0.1,
                           grad_sample_mode="ghost")     # any make_private keyword
print(report)
# --8<-- [end:sensitivity]
assert report.ok, report

# --8<-- [start:sensitivity_broken]
from ppml_fast.audit.broken import NoClipDPOptimizer     # clips at 1e9 C: not at all

report = check_sensitivity(model, nn.CrossEntropyLoss(), (x, y), max_grad_norm=0.1,
                           optimizer_class=NoClipDPOptimizer)
print(f"max ratio {report.max_ratio:.1f}: ok={report.ok}")
# --8<-- [end:sensitivity_broken]
assert not report.ok, report
