"""float32, bfloat16, float16 and float64 models (parameters and inputs in that dtype), both
grad-sample modes, flat and automatic clipping. Two batches per configuration:

- scaled-up records and repeated tokens (no cancellation): the clipped sum equals the float64
  reference of the very same (rounded) weights and inputs within the dtype's tolerance, and one
  record moves it by at most C;
- plus a cancellation record (x1 = M r + a, x2 = -M r + a, with M / |a| = 2^13 so that the
  float32 Gram matrix that 16-bit and float32 ghost norms accumulate in loses |a|^2 entirely
  (a^2 < 2^-24 M^2)): the dtype cannot represent that record's gradient, so only the bound is
  asserted (whatever the engine computed for the record, it must clip what it sums).
"""

from __future__ import annotations

import pytest
import torch

from tests.privacy.sensitivity import test_layers as layers
from tests.privacy.sensitivity._harness import Case, check_case, scaled, with_cancellation

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
B, T, D = layers.B, layers.T, layers.D


def _x(seed=1):
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _cancel(x, i):
    # M = 2^15 fits float16 (max 65504); a = 4: M / |a| = 2^13
    return with_cancellation(x, i, M=2.0**15, a_scale=4.0)


def _cases(dtype):
    big = 100.0 if dtype == torch.float16 else 1e4  # float16 overflows past 65504
    seq = scaled(_x(), 1, big)
    tokens = torch.randint(1, 16, (B, 6), generator=torch.Generator().manual_seed(4))
    tokens[1] = 5
    img = scaled(torch.randn(B, 2, 6, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64), 1, big)
    return {
        "linear_sequence": dict(build=layers._seeded(layers.SeqLinear), inputs=(seq,), adversarial=(1,)),
        "linear_sequence_cancellation": dict(build=layers._seeded(layers.SeqLinear), inputs=(_cancel(seq, 2),),
                                             adversarial=(1, 2), kappa=2.0**13),
        "layernorm_rmsnorm": dict(build=layers._seeded(layers.NormsNet), inputs=(seq,), adversarial=(1,)),
        "conv2d_groupnorm_instancenorm": dict(build=layers._seeded(layers.Conv2dNet), inputs=(img,), adversarial=(1,)),
        "embedding_repeated_tokens": dict(build=layers._seeded(layers.EmbeddingNet), inputs=(tokens,), adversarial=(1,)),
        "mha_cross_cancellation": dict(build=layers._seeded(layers.CrossAttention),
                                       inputs=(_x(3)[:, :2], _cancel(_x(5), 1)), adversarial=(1,), kappa=2.0**13),
        # scaled by 30 only: at 1e4 the attention scores (~1e8) make even plain float32 autograd
        # 72% off float64 for that record (see test_float32_saturated_attention below)
        "encoder": dict(build=layers._seeded(layers.Encoder, True), inputs=(scaled(_x(), 1, 30.0),),
                        adversarial=(1,)),
    }


NAMES = sorted(_cases(torch.float32))


@pytest.mark.parametrize("clipping", ["flat", "automatic"])
@pytest.mark.parametrize("mode", ["ghost", "materialize"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("name", NAMES)
def test_dtype(name, dtype, mode, clipping):
    kw = _cases(dtype)[name]
    kw.setdefault("target", layers._y())
    case = Case(name=f"{name}[{dtype},{mode},{clipping}]", dtype=dtype, mode=mode, clipping=clipping, **kw)
    check_case(case, replace=(clipping == "flat"))


@pytest.mark.xfail(strict=True, reason=(
    "known limitation, documented in README's security notes: in float32 a record whose gradient "
    "is ill-conditioned (attention scores ~1e8) is computed differently by batched kernels for "
    "different batch sizes, so its clipped contribution depends on its batch-mates (1.415 C "
    "measured); float64 (test below) holds the bound. strict: this test fails the suite if the "
    "limitation is ever lifted, so that the marker is removed"))
def test_float32_saturated_attention_record_moves_the_sum_by_at_most_c():
    """A record scaled by 1e4 through a TransformerEncoderLayer in float32: attention scores of
    ~1e8 make its float32 gradient chaotic (plain float32 autograd is 72% off the float64
    gradient of the same record), and it depends on which other records share the batch
    (batched kernels round differently by batch size). The clipped sum may then differ from the
    float64 reference (not asserted: the dtype cannot represent it), but removing a *clean*
    record must still move the sum by at most C: measured 1.415 C on the tree of this test's
    commit (the saturated record's clipped contribution changes direction when record 0 is
    removed). A fix must make a record's clipped contribution independent of its batch-mates
    (e.g. recompute records whose norms are ill-conditioned per record)."""
    kw = dict(build=layers._seeded(layers.Encoder, True), inputs=(scaled(_x(), 1, 1e4),), adversarial=(1,),
              target=layers._y(), kappa=2.0**40)  # kappa: the sum is not asserted, only the bound
    check_case(Case(name="encoder_float32_saturated", dtype=torch.float32, **kw))


def test_float64_saturated_attention_record_moves_the_sum_by_at_most_c():
    """The same saturated record in float64: its gradient no longer depends on the batch's
    rounding, and removing a clean record moves the sum by at most C."""
    kw = dict(build=layers._seeded(layers.Encoder, True), inputs=(scaled(_x(), 1, 1e4),), adversarial=(1,),
              target=layers._y(), kappa=2.0**40)
    check_case(Case(name="encoder_float64_saturated", dtype=torch.float64, **kw))
