"""torch's own attention (nn.MultiheadAttention, nn.TransformerEncoder) under the
engine, unmodified, against float64 torch.func per-example gradients: packed and
separate projections, self- and cross-attention, batch_first either way, masks,
the attention weights returned or not."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from privacy import PrivacyEngine
from tests.helpers.privacy import assert_engine_matches_reference

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")

BATCH, TOKENS, SOURCE, DIM = 6, 5, 4, 8


class AttentionModel(nn.Module):
    """One MultiheadAttention in a small model; the loss reads its output and,
    where it returns them, its attention weights."""

    def __init__(self, cross=False, kdim=None, bias=True, batch_first=True, need_weights=False, average=True,
                 masks=()):
        super().__init__()
        self.cross, self.batch_first, self.need_weights, self.average, self.masks = \
            cross, batch_first, need_weights, average, masks
        self.embed = nn.Linear(3, DIM)
        self.memory = nn.Linear(3, kdim or DIM)
        self.attn = nn.MultiheadAttention(DIM, 2, bias=bias, batch_first=batch_first, kdim=kdim, vdim=kdim)
        self.head = nn.Linear(DIM, 1)

    def forward(self, x, memory, padding):
        q = self.embed(x)
        kv = self.memory(memory) if self.cross else q
        length, source = q.shape[1], kv.shape[1]
        kwargs = {}
        if "causal" in self.masks:
            kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(length)
            kwargs["is_causal"] = True
        if "bool" in self.masks:
            kwargs["attn_mask"] = torch.ones(length, source, dtype=torch.bool).triu(2)
        if "padding" in self.masks:
            kwargs["key_padding_mask"] = padding[:, :source]
        if not self.batch_first:
            q, kv = q.transpose(0, 1), kv.transpose(0, 1)
        out, weights = self.attn(q, kv, kv, need_weights=self.need_weights, average_attn_weights=self.average,
                                 **kwargs)
        if not self.batch_first:
            out = out.transpose(0, 1)
        loss = self.head(out).squeeze(-1).square().sum(1)
        if self.need_weights:
            loss = loss + (weights * torch.linspace(-1, 1, weights.shape[-1])).flatten(1).sum(1)
        return loss


def attention_batch():
    g = torch.Generator().manual_seed(1)
    padding = torch.zeros(BATCH, TOKENS, dtype=torch.bool)
    padding[::2, -1] = True  # some examples pad their last key
    return torch.randn(BATCH, TOKENS, 3, generator=g), torch.randn(BATCH, SOURCE, 3, generator=g), padding


CASES = {
    "self, packed, batch_first": dict(),
    "self, sequence first, weights per head, padding": dict(batch_first=False, need_weights=True, average=False,
                                                            masks=("padding",)),
    "self, causal, no bias": dict(bias=False, masks=("causal",)),
    "self, causal with weights": dict(need_weights=True, masks=("causal",)),
    "cross, packed, bool mask": dict(cross=True, masks=("bool",)),
    "cross, separate q/k/v weights, padding, weights": dict(cross=True, kdim=6, need_weights=True,
                                                            masks=("padding",)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_multihead_attention_matches_per_example_reference(case):
    torch.manual_seed(0)
    model = AttentionModel(**CASES[case])
    inputs = attention_batch()
    with torch.no_grad():
        own = model(*inputs)  # torch's own forward (grad off: the engine leaves it alone)
    engine = PrivacyEngine(model, 1.0, 0.0, 1.0)
    wrapped = model(*inputs)
    engine.detach()
    torch.testing.assert_close(wrapped, own, rtol=1e-6, atol=1e-6)
    assert_engine_matches_reference(model, inputs)


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_matches_per_example_reference(norm_first):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(DIM, 2, 16, dropout=0.0, batch_first=True, norm_first=norm_first)

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch = nn.Conv2d(3, DIM, 4, 4)
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = nn.Linear(DIM, 5)

        def forward(self, images, labels):
            x = self.encoder(self.patch(images).flatten(2).transpose(1, 2))
            return F.cross_entropy(self.head(x.mean(1)), labels, reduction="none")

    g = torch.Generator().manual_seed(1)
    assert_engine_matches_reference(Encoder(), (torch.randn(BATCH, 3, 8, 8, generator=g),
                                                torch.randint(0, 5, (BATCH,), generator=g)))


def test_two_pass_mode_on_attention():
    torch.manual_seed(0)
    assert_engine_matches_reference(AttentionModel(cross=True), attention_batch(), two_pass=True)


@pytest.mark.parametrize("options, match", [
    (dict(add_zero_attn=True), r"0 \(MultiheadAttention\): MultiheadAttention\(add_bias_kv=True or add_zero_attn=True\)"),
    (dict(add_bias_kv=True), r"0 \(MultiheadAttention\) has trainable parameters \['bias_k', 'bias_v'\]"),
])
def test_attention_with_extra_key_tokens_is_refused_by_name(options, match):
    with pytest.raises(ValueError, match=match):
        PrivacyEngine(nn.Sequential(nn.MultiheadAttention(DIM, 2, **options)), 1.0, 0.0, 1.0)
