"""DP-Cap: conformance with the original code's outputs, the state-dict converter
against the original key layouts, named configs, KV-cache decoding, zero-shot, errors."""

import ast
import csv
from pathlib import Path

import pytest
import torch

import models
from models.tokenizer import EOS_ID, PAD_ID

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def conformance():
    """The fixture's model, loaded from the original-layout state dict, and the fixture."""
    ref = torch.load(FIXTURES / "dpcap_conformance_a.pt", weights_only=True)
    c = ref["config"]
    model = models.create_model(
        "dpcap_base", img_size=c["img"], embed_dim=c["enc"], depth=c["depth"], num_heads=c["heads"],
        decoder_embed_dim=c["dec"], decoder_depth=c["ddepth"], decoder_num_heads=c["dheads"],
        vocab_size=c["vocab"], text_max_length=ref["text_max_length"],
    )
    model.load_state_dict(models.convert_upstream_state_dict(ref["state_dict"]), strict=True)
    return model.eval(), ref


def test_conformance_loss_features_caption(conformance):
    model, ref = conformance
    with torch.no_grad():
        loss = model(ref["images"], ref["tokens"])
        feats = model.features(ref["images"])
    assert loss.shape == (4,) and feats.shape == ref["features"].shape
    torch.testing.assert_close(loss, ref["per_sample_loss"], atol=1e-5, rtol=0)
    torch.testing.assert_close(feats, ref["features"], atol=1e-5, rtol=0)
    caption = model.generate(ref["images"][:1], max_length=ref["text_max_length"])
    assert caption[0].tolist() == ref["greedy_caption"].tolist()


def test_frozen_tensors_are_loaded_not_redrawn(conformance):
    model, ref = conformance
    for name in ("cls_token", "encoder_image_type_embedding", "decoder_text_type_embedding", "pos_embed"):
        assert torch.equal(getattr(model, name), ref["state_dict"][name])
        assert not any(p is getattr(model, name) for p in model.parameters())


def test_round_trip_is_exact(conformance):
    _, ref = conformance
    back = models.to_upstream_state_dict(models.convert_upstream_state_dict(ref["state_dict"]))
    assert list(back) == list(ref["state_dict"])  # same keys, same order
    for k, v in ref["state_dict"].items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def test_converter_refuses_a_non_causal_mask(conformance):
    _, ref = conformance
    sd = dict(ref["state_dict"])
    sd["decoder.layers.0.self_attn.bias"] = torch.ones_like(sd["decoder.layers.0.self_attn.bias"])
    with pytest.raises(ValueError, match="causal"):
        models.convert_upstream_state_dict(sd)


def _read_tsv(name):
    with open(FIXTURES / f"dpcap_{name}_state_dict.tsv") as f:
        return {r["key"]: (tuple(ast.literal_eval(r["shape"])), r["requires_grad"]) for r in csv.DictReader(f, delimiter="\t")}


@pytest.mark.parametrize("size", ["tiny", "base", "large"])
def test_upstream_layouts(size):
    """Export of a freshly built model has the original key set, shapes and trainability;
    the original layout (all its keys) loads strictly after conversion."""
    rows = _read_tsv(size)
    with torch.device("meta"):
        model = models.create_model(f"dpcap_{size}")
    exported = models.to_upstream_state_dict(model.state_dict(keep_vars=True))
    assert list(exported) == list(rows)
    params = {id(p) for p in model.parameters()}
    for key, (shape, trainable) in rows.items():
        t = exported[key]
        assert tuple(t.shape) == shape, key
        if trainable == "buffer":
            assert key.endswith("self_attn.bias")
        else:
            assert (id(t) in params and t.requires_grad) == (trainable == "True"), key
    upstream = {
        k: torch.tril(torch.ones(s[-1], s[-1])).view(s) if r == "buffer" else torch.empty(s, device="meta")
        for k, (s, r) in rows.items()
    }
    model.load_state_dict(models.convert_upstream_state_dict(upstream), strict=True)


@pytest.mark.parametrize(
    "name, params",
    [("dpcap_nano", 20.8e6), ("dpcap_tiny", 59.4e6), ("dpcap_small", 115.7e6), ("dpcap_base", 189.8e6), ("dpcap_large", 407.4e6)],
)
def test_named_configs_trainable_params(name, params):
    with torch.device("meta"):
        model = models.create_model(name)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert abs(n - params) < 0.05e6, n
    assert len(model.blocks) == model.config.depth and len(model.decoder_blocks) == model.config.decoder_depth
