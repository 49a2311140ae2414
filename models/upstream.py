"""State dicts of the original code <-> this package's layout: DP-Cap's
(facebookresearch/dpcap, models_mae.py) and, for ViP, MAE's (facebookresearch/mae
and ViP-MAE, models_mae.MaskedAutoencoderViT).

Only names differ, plus one tensor: each original decoder layer stores its causal
mask as a buffer ``decoder.layers.{i}.self_attn.bias`` ([1, 1, 128, 128] lower-
triangular ones). Our decoder uses ``is_causal`` attention instead, so the mask is
checked and dropped on import and re-created on export. Everything else, the frozen
position embeddings, CLS token and type embeddings included, is carried as is.

    original                                          ours
    text_embedding_layer_SimVLM.weight                text_embed.weight
    decoder.layers.{i}.self_attn.c_attn               decoder_blocks.{i}.self_attn.qkv
    decoder.layers.{i}.self_attn.c_proj               decoder_blocks.{i}.self_attn.proj
    decoder.layers.{i}.multihead_attn.q_proj          decoder_blocks.{i}.cross_attn.q
    decoder.layers.{i}.multihead_attn.kv_proj         decoder_blocks.{i}.cross_attn.kv
    decoder.layers.{i}.multihead_attn.c_proj          decoder_blocks.{i}.cross_attn.proj
    decoder.layers.{i}.linear1 / linear2              decoder_blocks.{i}.fc1 / fc2
    decoder.layers.{i}.norm1..3                       decoder_blocks.{i}.norm1..3
    decoder_pred_text.0 / decoder_pred_text.1         head_norm / head
    (all other keys: same name)
"""

import re

import torch

CAUSAL_MASK_SIZE = 128  # the original decoder's block size: its mask buffer is [1, 1, 128, 128]

_KEY_PREFIXES = [  # (original, ours); {i} is a decoder layer, {j} a one-digit sub-layer
    ("text_embedding_layer_SimVLM.", "text_embed."),
    ("decoder.layers.{i}.self_attn.c_attn.", "decoder_blocks.{i}.self_attn.qkv."),
    ("decoder.layers.{i}.self_attn.c_proj.", "decoder_blocks.{i}.self_attn.proj."),
    ("decoder.layers.{i}.multihead_attn.q_proj.", "decoder_blocks.{i}.cross_attn.q."),
    ("decoder.layers.{i}.multihead_attn.kv_proj.", "decoder_blocks.{i}.cross_attn.kv."),
    ("decoder.layers.{i}.multihead_attn.c_proj.", "decoder_blocks.{i}.cross_attn.proj."),
    ("decoder.layers.{i}.linear{j}.", "decoder_blocks.{i}.fc{j}."),
    ("decoder.layers.{i}.norm{j}.", "decoder_blocks.{i}.norm{j}."),
    ("decoder_pred_text.0.", "head_norm."),
    ("decoder_pred_text.1.", "head."),
]


def _rename_table(reverse: bool) -> list[tuple[str, str]]:
    """(regex, replacement) pairs from _KEY_PREFIXES, in either direction."""
    table = []
    for original, ours in _KEY_PREFIXES:
        src, dst = (ours, original) if reverse else (original, ours)
        pattern = re.escape(src).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{j\}", r"(?P<j>\d)")
        table.append((pattern, dst.replace("{i}", r"\g<i>").replace("{j}", r"\g<j>")))
    return table


_RENAMES = _rename_table(reverse=False)
_OURS_TO_ORIGINAL = _rename_table(reverse=True)
_MASK_KEY = re.compile(r"decoder\.layers\.(\d+)\.self_attn\.bias$")


def _causal_mask() -> torch.Tensor:
    n = CAUSAL_MASK_SIZE
    return torch.tril(torch.ones(n, n)).view(1, 1, n, n)


def _rename(key: str, table: list[tuple[str, str]]) -> str:
    for pattern, repl in table:
        new, n = re.subn("^" + pattern, repl, key)
        if n:
            return new
    return key


def convert_upstream_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original DP-Cap state dict -> ours (load it with ``model.load_state_dict``)."""
    out = {}
    for key, value in sd.items():
        if _MASK_KEY.match(key):
            n = value.shape[-1]
            causal = value.shape == (1, 1, n, n) and torch.equal(value.cpu().float(), torch.tril(torch.ones(1, 1, n, n)))
            if not causal:
                raise ValueError(f"{key} is not a causal mask; this checkpoint's decoder is not the one DP-Cap trains")
            continue
        out[_rename(key, _RENAMES)] = value
    return out


def to_upstream_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our DP-Cap state dict -> the original layout, key order included."""
    out = {}
    for key, value in sd.items():
        if m := re.match(r"decoder_blocks\.(\d+)\.self_attn\.qkv\.weight$", key):
            # the original keeps its causal mask just before c_attn
            out[f"decoder.layers.{m.group(1)}.self_attn.bias"] = _causal_mask().to(value.device)
        out[_rename(key, _OURS_TO_ORIGINAL)] = value
    return out


# MAE's state dict (ViP-MAE's released checkpoints) has our ViP's names, timm block names
# included, except its bare tensors: our AddedParameter layers hold them as ``<name>.weight``
_MAE_BARE = ("cls_token", "pos_embed", "mask_token", "decoder_pos_embed")


def convert_mae_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original MAE / ViP-MAE state dict -> our ViP."""
    return {f"{key}.weight" if key in _MAE_BARE else key: value for key, value in sd.items()}


def to_mae_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our ViP state dict -> the original MAE layout."""
    return {key.removesuffix(".weight") if key.removesuffix(".weight") in _MAE_BARE else key: value
            for key, value in sd.items()}
