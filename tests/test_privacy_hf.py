"""The engine on Hugging Face transformers' vision encoders, built from small
configs (nothing downloaded), every parameter trainable, with a Linear head on
the pooled (or first) token, against float64 torch.func per-example gradients:
ViT, CLIP's and SigLIP's vision towers (a position embedding called on a one-row
buffer and broadcast over the batch; SigLIP's probe and nn.MultiheadAttention
head), DINOv2 (layer scales, mask token), Swin (its relative position bias made by
a child module, plus its shifted windows' mask), Swinv2 (cosine attention on
windows: F.normalize's vector norm and clamp_min in the rows' grouping proof; a
position bias MLP on a buffer) and ConvNeXt (its channels-first norms).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from privacy import PrivacyEngine
from tests.helpers.privacy import assert_engine_matches_reference, classification_batch

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")

CLASSES, BATCH, WIDTH = 5, 6, 8
TOWER = dict(hidden_size=WIDTH, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, image_size=16,
             patch_size=8)


class Classifier(nn.Module):
    """The encoder's pooled output (or its first token) through a Linear head."""

    def __init__(self, encoder: nn.Module, width: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(width, CLASSES)

    def forward(self, images, labels):
        out = self.encoder(pixel_values=images)
        pooled = out.pooler_output if getattr(out, "pooler_output", None) is not None else out.last_hidden_state[:, 0]
        return F.cross_entropy(self.head(pooled), labels, reduction="none")


# name -> (encoder builder, width of its output, image size)
MODELS = {
    "vit": (lambda: transformers.ViTModel(transformers.ViTConfig(**TOWER), add_pooling_layer=False), WIDTH, 16),
    "clip_vision": (lambda: transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TOWER)), WIDTH, 16),
    "siglip_vision": (lambda: transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**TOWER)), WIDTH, 16),
    "dinov2": (lambda: transformers.Dinov2Model(transformers.Dinov2Config(**TOWER)), WIDTH, 16),
    # 16x16 then 8x8 tokens in windows of 4x4, every second block shifted (its mask added to the bias table's)
    "swin": (lambda: transformers.SwinModel(transformers.SwinConfig(
        image_size=32, patch_size=2, embed_dim=8, depths=[2, 2], num_heads=[1, 2], window_size=4,
        drop_path_rate=0.0)), 16, 32),
    "swinv2": (lambda: transformers.Swinv2Model(transformers.Swinv2Config(
        image_size=32, patch_size=2, embed_dim=8, depths=[2, 2], num_heads=[1, 2], window_size=4,
        drop_path_rate=0.0)), 16, 32),
    "convnext": (lambda: transformers.ConvNextModel(transformers.ConvNextConfig(
        hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, layer_scale_init_value=0.5)), 16, 32),
}


def build(name: str):
    builder, width, size = MODELS[name]
    torch.manual_seed(0)
    return Classifier(builder(), width), classification_batch(BATCH, size, CLASSES)


@pytest.mark.parametrize("name", list(MODELS))
def test_transformers_encoder_matches_per_example_reference(name):
    assert_engine_matches_reference(*build(name))


def test_position_embedding_of_a_buffer_is_clipped_per_example():
    """CLIP's position embedding meets the batch only after its layer returned:
    it is covered as its Embedding, with no bare parameter of its own."""
    model, _ = build("clip_vision")
    engine = PrivacyEngine(model, 1.0, 0.0, 1.0)
    assert "encoder.embeddings.position_embedding.weight" in engine.covered_parameters
    assert engine.bare_parameters == ["encoder.embeddings.class_embedding"]
    engine.detach()


class PositionsAndTokens(nn.Module):
    """One Embedding called on a buffer of positions and on the batch's tokens."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(6, 4)
        self.register_buffer("positions", torch.arange(3).view(1, 3))

    def forward(self, tokens):
        return (self.embed(tokens) + self.embed(self.positions)).square().sum((1, 2))


def test_a_layer_on_a_buffer_and_on_the_batch_in_one_forward_is_refused():
    """Its two per-example gradients would be clipped as two parameters' (their
    norms added as if orthogonal): refused, naming it."""
    model = PositionsAndTokens()
    engine = PrivacyEngine(model, 1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match=r"embed\.weight: its layer is called both on the batch and on a constant"):
        engine.backward(model(torch.randint(0, 6, (4, 3))))


class WindowsThroughCosine(nn.Module):
    """Two windows of rows per example made unit vectors as Swinv2's cosine
    attention makes its queries and keys (F.normalize: a vector norm over the
    last dim, clamp_min, a division): proved grouped per example. ``over`` takes
    the norm over the examples instead (dim 0, the same as -3, or every dim),
    which mixes them."""

    def __init__(self, over: str | None = None):
        super().__init__()
        self.over = over
        self.first = nn.Linear(4, 4)
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        b, t, d = x.shape
        h = self.first(x).reshape(2 * b, t // 2, d)
        if self.over is None:
            h = F.normalize(h, dim=-1)
        else:
            dim = {"examples": 0, "examples_negative": -3, "all": None}[self.over]
            h = h / h.norm(dim=dim, keepdim=True).clamp_min(1e-6)
        return self.linear(h).reshape(b, t, d).square().sum((1, 2))


def test_rows_through_a_vector_norm_and_clamp_min_are_proved_and_exact():
    x = torch.randn(BATCH, 4, 4, generator=torch.Generator().manual_seed(1))
    assert_engine_matches_reference(WindowsThroughCosine(), (x,))


@pytest.mark.parametrize("over", ["examples", "examples_negative", "all"])
def test_a_vector_norm_over_the_examples_is_refused(over):
    model = WindowsThroughCosine(over)
    engine = PrivacyEngine(model, 1.0, 0.0, 4.0)
    with pytest.raises(ValueError, match=r"linear: .* LinalgVectorNormBackward0 over the example dimension"):
        engine.backward(model(torch.randn(4, 4, 4)))


def test_the_grouping_proof_reads_negative_dims_and_ends():
    """Autograd saves a negative dim or slice end as its unsigned 64-bit wrap:
    read as a remainder, -3 of a rank-3 tensor would be dim 1 (a mean over the
    examples taken for one within them) and an end of -1 past the end (a slice
    that drops an example's row taken for the whole dim)."""
    from privacy import graph

    x = torch.randn(4, 2, 3, requires_grad=True)  # a leaf of one row per example
    for mixed in (x - x.mean(-3, keepdim=True), x[:-1]):
        with pytest.raises(graph.Unproven, match=r"(MeanBackward1|SliceBackward0) (over|along) the example dim"):
            graph.rows_per_example(mixed.grad_fn, 0, 4)
    assert graph.rows_per_example((x - x.mean(-1, keepdim=True))[:, -1:].grad_fn, 0, 4) == 1
