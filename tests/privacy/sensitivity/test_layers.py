"""Every supported layer, in both grad-sample modes and all three clipping modes, with
adversarial records: the clipped sum of one step equals the float64 per-record reference and
one record moves it by at most the bound (see ``_harness``). Sequence layers get cancellation
records (x1 = M r + a, x2 = -M r + a at two positions, whose M parts cancel in the record's
gradient but not in a Gram-matrix norm), the others scaled-up records and huge activations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.privacy.sensitivity._harness import CANCEL_KAPPA, Case, check_case, scaled, with_cancellation

B, T, D, K = 6, 2, 16, 3  # T = 2, d = p = 16: the cost model picks the ghost path of sequence Linears
MODES = ("ghost", "materialize", "ghost_forced")  # ghost_forced: every rule's ghost path
CLIPPINGS = ("flat", "per_layer", "automatic")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _y(b=B):
    return torch.randint(0, K, (b,), generator=_gen(9))


def _seeded(cls, *args):
    def build():
        torch.manual_seed(0)
        return cls(*args).double()
    return build


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D, 12), nn.Linear(12, K)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class SeqLinear(nn.Module):
    """A Linear on every position, mean-pooled: positions share the output gradient."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(D, 12), nn.Linear(12, K)

    def forward(self, x):
        return self.head(self.fc(x).mean(1))


class Conv1dNet(nn.Module):
    """Conv1d with stride = kernel (disjoint patches), mean-pooled."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv1d(D // 2, 16, 2, stride=2), nn.Linear(16, K)

    def forward(self, x):
        return self.head(self.conv(x).mean(-1))


class Conv2dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.inorm = nn.InstanceNorm2d(4, affine=True)
        self.head = nn.Linear(4, K)

    def forward(self, x):
        return self.head(torch.tanh(self.inorm(self.gn(self.conv(x)))).mean((2, 3)))


class Conv3dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 3, 2, stride=2)
        self.inorm = nn.InstanceNorm3d(3, affine=True)
        self.head = nn.Linear(3, K)

    def forward(self, x):
        return self.head(self.inorm(self.conv(x)).pow(2).mean((2, 3, 4)))


class EmbeddingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(16, D, padding_idx=0), nn.Linear(D, K)

    def forward(self, tokens):
        return self.head(self.emb(tokens).mean(1))


class NormsNet(nn.Module):
    """Linear -> LayerNorm -> RMSNorm on a sequence."""

    def __init__(self):
        super().__init__()
        self.fc, self.ln, self.rms, self.head = nn.Linear(D, D), nn.LayerNorm(D), nn.RMSNorm(D), nn.Linear(D, K)

    def forward(self, x):
        return self.head(self.rms(self.ln(self.fc(x))).mean(1))


class SelfAttention(nn.Module):
    """MHA self-attention whose query/key projections ignore the first half of the features: the
    attention is uniform over positions with the same second half, so a cancellation pair's
    value-projection gradients share one output gradient and cancel exactly."""

    def __init__(self, batch_first=True):
        super().__init__()
        self.mha = nn.MultiheadAttention(D, 2, batch_first=batch_first)
        self.head = nn.Linear(D, K)
        with torch.no_grad():
            self.mha.in_proj_weight[:2 * D, :D // 2] = 0

    def forward(self, x):
        return self.head(self.mha(x, x, x)[0].mean(1))


class CrossAttention(nn.Module):
    """Queries from x, keys and values from mem (separate projections). The key projection is
    blind to the first half of the features and the query/key projections are frozen (only
    values, output and head train): a cancellation pair in mem gets uniform attention, so its
    value-projection gradient cancels the M parts exactly and dominates the record's norm."""

    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(D, 2, batch_first=True, kdim=D, vdim=D + 2)
        self.head = nn.Linear(D, K)
        with torch.no_grad():
            self.mha.k_proj_weight[:, :D // 2] = 0
        self.mha.q_proj_weight.requires_grad_(False)
        self.mha.k_proj_weight.requires_grad_(False)

    def forward(self, x, mem):
        mem_v = torch.cat([mem, mem[..., :2]], -1)
        return self.head(self.mha(x, mem, mem_v)[0].mean(1))


class Encoder(nn.Module):
    def __init__(self, batch_first=True):
        super().__init__()
        self.batch_first = batch_first
        self.enc = nn.TransformerEncoderLayer(D, 2, dim_feedforward=16, dropout=0.0, batch_first=batch_first)
        self.head = nn.Linear(D, K)
        with torch.no_grad():  # scores blind to the first half (as SelfAttention): with M = 2^30
            # there, scores ~ M^2 would make the softmax chaotic (any rounding flips it)
            self.enc.self_attn.in_proj_weight[:2 * D, :D // 2] = 0

    def forward(self, x):
        return self.head(self.enc(x).mean(1 if self.batch_first else 0))


class Scale(nn.Module):
    """A layer no rule knows (the torch.func path)."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d))
        self.b = nn.Parameter(torch.randn(d) * 0.1)

    def forward(self, x):
        return x * torch.tanh(self.w) + self.b


class FuncNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale, self.fc = Scale(D), nn.Linear(D, K)

    def forward(self, x):
        return self.fc(torch.sin(self.scale(x)).mean(1))


class PointNet(nn.Module):
    """(B, T, d) flattened to (B*T, d) before a Linear: rows are not records (issue 14, 1a)."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(D, 12), nn.Linear(12, K)

    def forward(self, x):
        b, t, d = x.shape
        return self.head(self.fc(x.reshape(b * t, d)).reshape(b, t, -1).amax(1))


def _seq(b=B, t=T, d=D, seed=1):
    return torch.randn(b, t, d, generator=_gen(seed), dtype=torch.float64)


def _cases():
    """name -> (mode, clipping) -> Case."""
    x2 = torch.randn(B, D, generator=_gen(1), dtype=torch.float64)
    seq = with_cancellation(scaled(_seq(), 1, 1e4), 2)
    conv1 = with_cancellation(_seq(t=T, d=D), 2)  # (B, T, D): patch t = (D/2 channels, 2 taps)
    conv1 = conv1.reshape(B, T, D // 2, 2).permute(0, 2, 1, 3).reshape(B, D // 2, 2 * T)
    img = torch.randn(B, 2, 6, 6, generator=_gen(2), dtype=torch.float64)
    img = scaled(img, 1, 1e4)
    img[2, 0, 3, 3] = 1e6  # one huge pixel
    vol = torch.randn(B, 1, 4, 4, 4, generator=_gen(3), dtype=torch.float64)
    vol = scaled(vol, 1, 1e3)
    vol[2, 0, :2, :2, :2] = 2.0**20
    vol[2, 0, 2:, 2:, 2:] = -(2.0**20)
    tokens = torch.randint(1, 16, (B, 6), generator=_gen(4))
    tokens[1] = 5  # repeated token
    tokens[2] = 0  # padding only
    tokens[3, :5] = 7
    mem = with_cancellation(_seq(t=3, seed=5), 1)
    seq_first = with_cancellation(scaled(_seq(), 1, 1e3), 2).transpose(0, 1).contiguous()
    square = with_cancellation(_seq(b=4, t=4), 2)  # B = T = 4
    cases = {
        "linear": dict(build=_seeded(Mlp), inputs=(scaled(x2, 1, 1e4),), adversarial=(1,)),
        "linear_sequence": dict(build=_seeded(SeqLinear), inputs=(seq,), adversarial=(1, 2)),
        "conv1d": dict(build=_seeded(Conv1dNet), inputs=(conv1,), adversarial=(2,)),
        "conv2d_groupnorm_instancenorm": dict(build=_seeded(Conv2dNet), inputs=(img,), adversarial=(1, 2)),
        "conv3d_instancenorm3d": dict(build=_seeded(Conv3dNet), inputs=(vol,), adversarial=(1, 2)),
        "embedding_repeated_tokens": dict(build=_seeded(EmbeddingNet), inputs=(tokens,), adversarial=(1, 3)),
        "layernorm_rmsnorm": dict(build=_seeded(NormsNet), inputs=(seq,), adversarial=(1, 2)),
        "mha_self": dict(build=_seeded(SelfAttention), inputs=(with_cancellation(_seq(), 2),), adversarial=(2,)),
        "mha_cross": dict(build=_seeded(CrossAttention), inputs=(_seq(t=3), mem), adversarial=(1,)),
        "encoder_batch_first": dict(build=_seeded(Encoder, True), inputs=(seq,), adversarial=(1, 2)),
        "encoder_seq_first": dict(build=_seeded(Encoder, False), inputs=(seq_first,), adversarial=(1, 2),
                                  record_dim=1, batch_first=False),
        "torch_func_layer": dict(build=_seeded(FuncNet), inputs=(seq,), adversarial=(1, 2)),
        # issue 14 item 1: correct, or refused before any parameter changes
        "encoder_seq_first_engine_batch_first": dict(
            build=_seeded(Encoder, False), inputs=(seq_first,), adversarial=(1, 2), record_dim=1,
            refuse_ok=True),
        "encoder_seq_first_engine_batch_first_B_eq_T": dict(
            build=_seeded(Encoder, False), inputs=(square.transpose(0, 1).contiguous(),),
            adversarial=(2,), record_dim=1, refuse_ok=True, target=_y(4)),
        "rows_not_records_pointnet": dict(build=_seeded(PointNet), inputs=(seq,), adversarial=(1, 2),
                                          refuse_ok=True),
    }
    for name in ("linear_sequence", "conv1d", "layernorm_rmsnorm", "mha_self", "mha_cross", "encoder_batch_first",
                 "encoder_seq_first", "torch_func_layer", "encoder_seq_first_engine_batch_first",
                 "encoder_seq_first_engine_batch_first_B_eq_T", "rows_not_records_pointnet"):
        cases[name]["kappa"] = CANCEL_KAPPA
    return cases


CASES = _cases()


@pytest.mark.parametrize("clipping", CLIPPINGS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(CASES))
def test_layer(name, mode, clipping):
    kw = dict(CASES[name])
    kw.setdefault("target", _y())
    forced = mode == "ghost_forced"
    case = Case(name=f"{name}[{mode},{clipping}]", mode="ghost" if forced else mode, clipping=clipping,
                rules="ghost" if forced else None, **kw)
    check_case(case, replace=(clipping == "flat"))
