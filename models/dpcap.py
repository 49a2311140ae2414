"""DP-Cap (Sander et al., ICML 2024): a ViT image encoder and an autoregressive
caption decoder, trained by next-token prediction.

    images [B, 3, H, W] --ViT (pre-norm, frozen sin-cos pos)--> [B, M, D]     M = 1 + (H/p)^2
        --decoder_embed + fixed pos + image type--> memory [B, M, Dd]
    tokens [B, T] --embed + fixed pos + text type--> post-norm decoder layers
        (causal self-attn, cross-attn to memory, FFN) --LN, Linear--> logits [B, T, V]

Semantics follow the released code (models_mae.py, model/torch_transformer.py)
so that its checkpoints give the same numbers: see models/upstream.py for the
key layout. The fixed position embeddings and the (frozen, randomly drawn) CLS
token and type embeddings are persistent buffers, loaded from checkpoints.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.layers import Block, PatchEmbed, init_weights_, sincos_1d, sincos_2d
from models.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer, load_tokenizer

ZERO_SHOT_PROMPT = "this is a photo of a"


@dataclass(frozen=True, kw_only=True)
class DPCapConfig:
    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768  # encoder width
    depth: int = 12  # encoder blocks
    num_heads: int = 12
    decoder_embed_dim: int = 768  # decoder width (memory and text)
    decoder_depth: int = 6
    decoder_num_heads: int = 12
    mlp_ratio: float = 4.0
    vocab_size: int = 30522  # BERT uncased WordPiece
    text_max_length: int = 40  # longest token sequence (incl. [CLS] and [SEP]) the decoder sees


def caption_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per-example next-token cross-entropy: logits [B, T-1, V] predict tokens[:, 1:];
    PAD targets are ignored; each example's sum is divided by its number of non-PAD
    targets (an example with none gets 0, not NaN)."""
    targets = tokens[:, 1:].long()
    ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=PAD_ID, reduction="none")
    count = (targets != PAD_ID).sum(dim=1)
    return ce.view_as(targets).sum(dim=1) / count.clamp(min=1)


@dataclass
class DecodeCache:
    """Inference state of one decoder block: the memory's keys and values,
    computed once, and (when ``max_length`` > 0) the text's keys and values so far."""

    repeat: int = 1  # text rows per memory row (zero-shot scores every class name per image)
    max_length: int = 0
    memory_kv: tuple[torch.Tensor, torch.Tensor] | None = None
    k: torch.Tensor | None = None  # [B, H, max_length, hd]
    v: torch.Tensor | None = None
    length: int = 0


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"decoder width {dim} must be divisible by decoder_num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cache: DecodeCache | None = None) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        if cache is not None and cache.max_length:
            if cache.k is None:
                cache.k = k.new_empty(B, self.num_heads, cache.max_length, D // self.num_heads)
                cache.v = torch.empty_like(cache.k)
            start, end = cache.length, cache.length + T
            assert T == 1 or start == 0, "several new tokens only into an empty cache"
            cache.k[:, :, start:end], cache.v[:, :, start:end] = k, v
            cache.length = end
            k, v = cache.k[:, :, :end], cache.v[:, :, :end]
        x = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)  # [B, H, T, hd]
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


class CrossAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, cache: DecodeCache | None = None) -> torch.Tensor:
        B, T, D = x.shape
        hd = D // self.num_heads
        if cache is None or cache.memory_kv is None:
            M = memory.shape[1]
            k, v = self.kv(memory).view(-1, M, 2, self.num_heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
            if cache is not None:
                k, v = k.repeat_interleave(cache.repeat, 0), v.repeat_interleave(cache.repeat, 0)
                cache.memory_kv = (k, v)
        else:
            k, v = cache.memory_kv
        q = self.q(x).view(B, T, self.num_heads, hd).transpose(1, 2)
        x = F.scaled_dot_product_attention(q, k, v)  # no mask: every text token sees all of memory
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


class DecoderBlock(nn.Module):
    """Post-norm: x = LN1(x + SelfAttn(x)); x = LN2(x + CrossAttn(x, mem)); x = LN3(x + FFN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        # declared in the original's order, so that exported state dicts list keys as it does
        self.self_attn = CausalSelfAttention(dim, num_heads)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.fc1 = nn.Linear(dim, int(dim * mlp_ratio), bias=False)
        self.fc2 = nn.Linear(int(dim * mlp_ratio), dim, bias=False)
        self.norm1 = nn.LayerNorm(dim)  # torch's default eps 1e-5, as the original decoder
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None, cache: DecodeCache | None = None) -> torch.Tensor:
        x = self.norm1(x + self.self_attn(x, cache))
        x = self.norm2(x + self.cross_attn(x, memory, cache))
        return self.norm3(x + self.fc2(F.gelu(self.fc1(x))))


class DPCap(nn.Module):
    def __init__(self, config: DPCapConfig):
        super().__init__()
        self.config = c = config
        D, Dd = c.embed_dim, c.decoder_embed_dim
        # encoder (modules declared in the original's order, for the key order of exports)
        self.patch_embed = PatchEmbed(c.img_size, c.patch_size, D)
        M = self.patch_embed.num_patches + 1
        self.text_embed = nn.Embedding(c.vocab_size, Dd)
        self.blocks = nn.ModuleList([Block(D, c.num_heads, c.mlp_ratio, qkv_bias=False) for _ in range(c.depth)])
        self.norm = nn.LayerNorm(D, eps=1e-6)
        # bridge to the decoder: memory = decoder_embed(encoder output) + pos + image type
        self.decoder_embed = nn.Linear(D, Dd)
        # text decoder
        self.decoder_blocks = nn.ModuleList(
            [DecoderBlock(Dd, c.decoder_num_heads, c.mlp_ratio) for _ in range(c.decoder_depth)]
        )
        self.head_norm = nn.LayerNorm(Dd)
        self.head = nn.Linear(Dd, c.vocab_size)
        # frozen tensors, named as in the original checkpoints
        # (text_pos_embed, mask_token, mask_token_text and encoder_text_type_embedding are
        # never read by captioning: kept for a faithful export)
        frozen = {
            "text_pos_embed": (1, c.text_max_length, D),
            "cls_token": (1, 1, D),
            "pos_embed": (1, M, D),
            "mask_token": (1, 1, Dd),
            "mask_token_text": (1, 1, Dd),
            "decoder_pos_embed": (1, M, Dd),
            "text_decoder_pos_embed": (1, c.text_max_length, Dd),
            "encoder_image_type_embedding": (1, 1, D),
            "decoder_image_type_embedding": (1, 1, Dd),
            "encoder_text_type_embedding": (1, 1, D),
            "decoder_text_type_embedding": (1, 1, Dd),
        }
        for name, shape in frozen.items():
            self.register_buffer(name, torch.zeros(shape))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The original initialisation (also after ``to_empty`` from the meta device)."""
        c, grid = self.config, self.patch_embed.grid_size
        init_weights_(self)
        self.text_embed.reset_parameters()  # N(0, 1): the original leaves nn.Embedding's default
        self.pos_embed.copy_(sincos_2d(c.embed_dim, grid, cls_token=True))
        self.decoder_pos_embed.copy_(sincos_2d(c.decoder_embed_dim, grid, cls_token=True))
        self.text_pos_embed.copy_(sincos_1d(c.embed_dim, c.text_max_length))
        self.text_decoder_pos_embed.copy_(sincos_1d(c.decoder_embed_dim, c.text_max_length))
        for name in ("cls_token", "mask_token", "mask_token_text", "encoder_image_type_embedding",
                     "decoder_image_type_embedding", "encoder_text_type_embedding", "decoder_text_type_embedding"):
            nn.init.normal_(getattr(self, name), std=0.02)

    # ---------------------------------------------------------------- encoder
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> memory [B, M, Dd] (probes mean-pool it over M)."""
        x = self.patch_embed(images)  # [B, L, D]
        x = x + self.pos_embed[:, 1:].to(x.dtype)
        cls = (self.cls_token + self.pos_embed[:, :1]).to(x.dtype).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.encoder_image_type_embedding.to(x.dtype)  # [B, M, D]
        for blk in self.blocks:
            x = blk(x)
        x = self.decoder_embed(self.norm(x))  # [B, M, Dd]
        return x + (self.decoder_pos_embed + self.decoder_image_type_embedding).to(x.dtype)

    # ---------------------------------------------------------------- decoder
    def _embed_text(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        """tokens [B, T] at positions start..start+T-1 -> [B, T, Dd]."""
        x = self.text_embed(tokens)
        pos = self.text_decoder_pos_embed[:, start : start + tokens.shape[1]] + self.decoder_text_type_embedding
        return x + pos.to(x.dtype)

    def _decode(
        self, tokens: torch.Tensor, memory: torch.Tensor, caches: list[DecodeCache] | None = None, start: int = 0
    ) -> torch.Tensor:
        """Decoder states [B, T, Dd] of ``tokens``; with ``caches`` (one per block) incremental."""
        x = self._embed_text(tokens, start)
        for i, blk in enumerate(self.decoder_blocks):
            x = blk(x, memory, None if caches is None else caches[i])
        return x

    def _check_tokens(self, tokens: torch.Tensor, min_length: int = 1) -> None:
        c = self.config
        if tokens.ndim != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be an int64 or int32 tensor [B, T], got {tokens.dtype} {list(tokens.shape)}")
        if not min_length <= tokens.shape[1] <= c.text_max_length:
            raise ValueError(
                f"token sequences of length {tokens.shape[1]}: need {min_length} to text_max_length="
                f"{c.text_max_length}; truncate the captions or build the model with a larger text_max_length"
            )
        if tokens.numel() and tokens.device.type != "meta" and not torch.compiler.is_compiling():  # values known
            # checked on the device: no host sync per micro-batch on a GPU, where a bad id stops the
            # run at the next sync with this message (on a CPU at once, as the ValueError below)
            message = f"token ids must lie in [0, vocab_size={c.vocab_size}); check the tokenizer's vocabulary"
            try:
                torch._assert_async(((tokens >= 0) & (tokens < c.vocab_size)).all(), message)
            except RuntimeError as error:
                raise ValueError(message) from error

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W], tokens [B, T] ([CLS] ... [SEP] then PAD) -> per-example loss [B]."""
        self._check_tokens(tokens, min_length=2)
        x = self._decode(tokens, self.features(images))  # [B, T, Dd]
        logits = self.head(self.head_norm(x[:, :-1]))  # the last position predicts nothing
        return caption_loss(logits, tokens)

    # ------------------------------------------------------------- inference
    def _new_caches(self, max_length: int, repeat: int = 1) -> list[DecodeCache]:
        return [DecodeCache(repeat=repeat, max_length=max_length) for _ in self.decoder_blocks]

    def _next_logits(self, tokens, memory, caches, start: int) -> torch.Tensor:
        """Feed ``tokens`` [B, T] at ``start`` through the cached decoder -> logits [B, V] of the last one."""
        x = self._decode(tokens, memory, caches, start)
        return self.head(self.head_norm(x[:, -1])).float()

    @torch.no_grad()
    def generate(self, images: torch.Tensor, max_length: int | None = None) -> torch.Tensor:
        """Greedy captions: [B, 1 + n] with n <= max_length (default text_max_length)
        new tokens after [CLS]; a caption stops at its [SEP] and is padded with 0.
        One encoder pass, then one decoder step per token with a KV cache."""
        c = self.config
        max_length = c.text_max_length if max_length is None else max_length
        if not 1 <= max_length <= c.text_max_length:
            raise ValueError(f"max_length must lie in [1, text_max_length={c.text_max_length}], got {max_length}")
        memory = self.features(images)
        B = memory.shape[0]
        out = torch.full((B, max_length + 1), PAD_ID, dtype=torch.long, device=memory.device)
        out[:, 0] = BOS_ID
        done = torch.zeros(B, dtype=torch.bool, device=memory.device)
        caches = self._new_caches(max_length)
        for t in range(max_length):
            nxt = self._next_logits(out[:, t : t + 1], memory, caches, start=t).argmax(-1)
            out[:, t + 1] = nxt.masked_fill(done, PAD_ID)
            done |= nxt == EOS_ID
            if bool(done.all()):
                return out[:, : t + 2]
        return out

    @torch.no_grad()
    def zero_shot(
        self,
        images: torch.Tensor,
        class_names: Sequence[str | Sequence[str]],
        method: str = "loss",
        tokenizer: Tokenizer | None = None,
        prompt: str = ZERO_SHOT_PROMPT,
        max_rows: int = 1024,  # bounds the [rows, T, vocab] logits
    ) -> torch.Tensor:
        """Predicted class index [B] by caption likelihood.

        Each class is a name or a list of synonyms. ``"loss"`` scores
        "[CLS] <prompt> <name> [SEP]" for every name by its mean cross-entropy
        (the training loss) and takes the argmin; ``"trie"`` decodes greedily
        after the prompt, restricted at each step to the continuations of a
        prefix trie of all names (cost grows with the trie's depth, not the
        number of names). The encoder runs once per image either way; ``"loss"``
        decodes at most ``max_rows`` (image, name) pairs at a time.
        """
        if method not in ("loss", "trie"):
            raise ValueError(f"method must be 'loss' or 'trie', got {method!r}")
        tokenizer = tokenizer or load_tokenizer()
        names = [[n] if isinstance(n, str) else list(n) for n in class_names]
        if not names or not all(names):
            raise ValueError("class_names must be a non-empty list of names (or non-empty lists of synonyms)")
        prompt_ids = [BOS_ID, *tokenizer.wordpieces(prompt)]
        seqs, owner = [], []  # each name's ids after the prompt, ending with [SEP]; its class
        for cls, synonyms in enumerate(names):
            for name in synonyms:
                seqs.append([*tokenizer.wordpieces(name), EOS_ID])
                owner.append(cls)
        longest = len(prompt_ids) + max(map(len, seqs))
        if longest > self.config.text_max_length:
            raise ValueError(
                f"prompt + class name take {longest} tokens, more than text_max_length="
                f"{self.config.text_max_length}: shorten the names or the prompt"
            )
        if max(max(s) for s in seqs) >= self.config.vocab_size:
            raise ValueError(f"the tokenizer yields ids beyond vocab_size={self.config.vocab_size}")
        memory = self.features(images)
        if method == "loss":
            return self._zero_shot_loss(memory, prompt_ids, seqs, owner, max_rows)
        return self._zero_shot_trie(memory, prompt_ids, seqs, owner)

    def _zero_shot_loss(self, memory, prompt_ids, seqs, owner, max_rows) -> torch.Tensor:
        B, N = memory.shape[0], len(seqs)
        L = len(prompt_ids) + max(map(len, seqs))
        tokens = torch.full((N, L), PAD_ID, dtype=torch.long, device=memory.device)
        for i, s in enumerate(seqs):
            ids = prompt_ids + s
            tokens[i, : len(ids)] = torch.tensor(ids)
        losses = memory.new_empty(B, N, dtype=torch.float32)
        per_image = max(1, max_rows // N)  # images per chunk, all names of an image at once
        for i in range(0, B, per_image):
            mem = memory[i : i + per_image]
            b = mem.shape[0]
            toks = tokens.repeat(b, 1)  # [b*N, L], image-major
            x = self._decode(toks, mem, self._new_caches(0, repeat=N))
            losses[i : i + b] = caption_loss(self.head(self.head_norm(x[:, :-1])), toks).view(b, N)
        best = losses.argmin(dim=1)  # first minimum: the earlier class wins a tie
        return torch.tensor(owner, device=memory.device)[best]

    def _zero_shot_trie(self, memory, prompt_ids, seqs, owner) -> torch.Tensor:
        root: dict = {}
        for s, cls in zip(seqs, owner):
            node = root
            for tok in s[:-1]:
                node = node.setdefault(tok, {})
            node.setdefault(EOS_ID, cls)  # a name reached twice keeps its first class
        B, P = memory.shape[0], len(prompt_ids)
        depth = max(map(len, seqs))
        caches = self._new_caches(P + depth - 1)
        prompt = torch.tensor(prompt_ids, device=memory.device).expand(B, -1)
        logits = self._next_logits(prompt, memory, caches, start=0)  # [B, V]
        nodes, pred = [root] * B, [-1] * B
        for t in range(depth):
            allowed = torch.zeros_like(logits, dtype=torch.bool)
            for b, node in enumerate(nodes):
                if pred[b] < 0:
                    allowed[b, list(node)] = True
            choice = logits.masked_fill(~allowed, float("-inf")).argmax(-1).tolist()
            for b in range(B):
                if pred[b] < 0:
                    nodes[b] = nodes[b][choice[b]]
                    if choice[b] == EOS_ID:
                        pred[b] = nodes[b]
            if min(pred) >= 0:
                break
            step = torch.tensor(choice, device=memory.device).view(B, 1)
            logits = self._next_logits(step, memory, caches, start=P + t)
        return torch.tensor(pred, device=memory.device)


_SIZES = {
    "nano": dict(embed_dim=192, depth=12, num_heads=6, decoder_embed_dim=192, decoder_num_heads=6),
    "tiny": dict(embed_dim=384, depth=12, num_heads=6, decoder_embed_dim=384, decoder_num_heads=6),
    "small": dict(embed_dim=576, depth=12, num_heads=12, decoder_embed_dim=576, decoder_num_heads=12),
    "base": dict(embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=768, decoder_num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16, decoder_embed_dim=768, decoder_num_heads=12),
}
CONFIGS = {f"dpcap_{size}": DPCapConfig(**kw) for size, kw in _SIZES.items()}
