"""The ExtreMA encoder: a CaiT-style ViT with no [cls] token at the input.

Patch tokens (+ fixed sin-cos positions) go through `depth` pre-norm blocks; a learned [cls] token then
reads them through `class_attention_layers` class-attention blocks. The embedding is the normed [cls].
The student may see only a subset of tokens per mask: `keep` holds the kept token indices per mask and
the masked views are stacked mask-major along the batch (rows [0, B) are mask 0, [B, 2B) mask 1, ...).
Parameter names equal the reference's, so its checkpoints load without renaming.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from timm.layers import Attention, PatchEmbed
from timm.models.cait import LayerScaleBlockClassAttn
from timm.models.vision_transformer import Block
from torch import nn

from extrema.models.pos_embed import sincos_2d_table

LayerNorm6 = partial(nn.LayerNorm, eps=1e-6)

KeepIndices = torch.Tensor | Sequence[torch.Tensor]
DropDraws = torch.Tensor
"""Per-row stochastic-depth draws: uniforms in [0, 1) of shape (B, depth, 2), or mask-major (M, B, depth, 2) with
`keep`; [..., i, 0] decides block i's attention branch, [..., i, 1] its MLP branch (kept where u >= the block's
rate). Drawn per image from its own stream, a row's drop decisions do not depend on which rows share its batch."""


def stack_keep(keep: KeepIndices) -> torch.Tensor:
    """Return keep-indices as one (M, B, k) LongTensor from a tensor or a list of (B, k) tensors."""
    if isinstance(keep, torch.Tensor):
        if keep.dim() == 2:
            keep = keep[None]
        if keep.dim() != 3:
            raise ValueError(f"keep must be (M, B, k) or (B, k); got shape {tuple(keep.shape)}")
        return keep
    return torch.stack(list(keep))


class SelfAttention(Attention):
    """timm's multi-head self-attention, with the attention kernel chosen per call.

    `F.scaled_dot_product_attention` everywhere except bf16 training on a CPU: there torch's flash kernel
    has a slow backward (ViT-S, 39 tokens: 3x the time of the explicit softmax(q k^T / sqrt(d)) v, whose
    two matmuls run on the CPU's bf16 matrix units). Both forms give the same result up to bf16 rounding.
    """

    @property
    def fused_attn(self) -> bool:
        return self._fused_allowed and not _cpu_bf16_with_grad(self.qkv.weight)

    @fused_attn.setter
    def fused_attn(self, allowed: bool) -> None:
        self._fused_allowed = allowed  # timm's choice (its TIMM_FUSED_ATTN setting)


def _cpu_bf16_with_grad(weight: torch.Tensor) -> bool:
    """True when a bf16 backward may follow on a CPU (bf16 autocast or a bf16 model, gradients on)."""
    if weight.device.type != "cpu" or not torch.is_grad_enabled():
        return False
    autocast_bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    return autocast_bf16 or weight.dtype == torch.bfloat16


class ExtremaViT(nn.Module):
    """CaiT-style ViT encoder: `forward` gives the (B', D) embedding; `head` is the projector slot, which
    `forward_head` applies (timm's split into `forward_features` and `forward_head`)."""

    def __init__(
        self,
        *,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        class_attention_layers: int = 2,
        layer_scale_init: float = 0.1,
        drop_path_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=3, embed_dim=embed_dim)
        self.grid_size: tuple[int, int] = tuple(self.patch_embed.grid_size)
        self.num_tokens = self.grid_size[0] * self.grid_size[1]
        # A buffer, not a Parameter: never trained, never decayed, but saved (the reference stores it).
        self.register_buffer("pos_embed", sincos_2d_table(self.grid_size, embed_dim), persistent=True)
        self.pos_drop = nn.Dropout(pos_drop_rate)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))

        rates = torch.linspace(0, drop_path_rate, depth).tolist()  # stochastic depth grows with depth
        self.register_buffer("drop_path_rates", torch.tensor(rates), persistent=False)  # (depth,)
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=True,
                attn_drop=attn_drop_rate,
                drop_path=rate,
                norm_layer=LayerNorm6,
                attn_layer=SelfAttention,
            )
            for rate in rates
        )
        self.blocks_token = nn.ModuleList(
            LayerScaleBlockClassAttn(
                embed_dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=True,
                attn_drop=attn_drop_rate,
                drop_path=0.0,
                norm_layer=LayerNorm6,
                init_values=layer_scale_init,
            )
            for _ in range(class_attention_layers)
        )
        self.norm = LayerNorm6(embed_dim)
        self.head: nn.Module = nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        """Reference init: xavier-uniform Linears with zero bias, unit LayerNorms, xavier patch projection."""
        nn.init.normal_(self.cls_token, std=0.02)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for module in self.modules():
            if isinstance(module, nn.Linear):
                init_linear(module)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # gamma_1/gamma_2 keep the layer_scale_init value timm's block gave them.

    def no_weight_decay(self) -> set[str]:
        """Names excluded from weight decay besides 1-D tensors (the position table is a buffer)."""
        return {"cls_token", "pos_embed"}

    def embed_tokens(self, images: torch.Tensor, keep: KeepIndices | None = None) -> torch.Tensor:
        """Patchify, add positions, and gather the kept tokens: (B, N, D) or mask-major (M*B, k, D)."""
        # Images stay NCHW (contiguous): with channels_last input the CPU patch projection (a stride-p
        # convolution) ran 1.2-1.4x slower, forward + backward; it is 1-2% of the step either way.
        x = self.patch_embed(images) + self.pos_embed.to(images.dtype)  # (B, N, D)
        if keep is not None:
            idx = stack_keep(keep).to(x.device)  # (M, B, k)
            m, b, k = idx.shape
            if b != x.shape[0]:
                raise ValueError(f"keep-indices are for batch {b} but the images have batch {x.shape[0]}")
            # One index_select for all masks over the (B*N, D) token rows; its backward adds into a (B*N, D)
            # gradient (a gather from an expanded (M, B, N, D) view would scatter into an M times larger one).
            n = x.shape[1]
            rows = idx + torch.arange(b, device=x.device)[:, None] * n  # (M, B, k) flat row of each kept token
            x = x.reshape(b * n, -1).index_select(0, rows.reshape(-1)).view(m * b, k, -1)  # mask-major rows
        return self.pos_drop(x)

    def forward_tokens(
        self, images: torch.Tensor, keep: KeepIndices | None = None, drops: DropDraws | None = None
    ) -> torch.Tensor:
        """Patch tokens after the self-attention blocks, un-normed: (B', n, D). `drops`: see `DropDraws` (None:
        timm's DropPath draws from the global RNG, per batch)."""
        return run_blocks(self.blocks, self.embed_tokens(images, keep), self.drop_path_scales(drops))

    def drop_path_scales(self, drops: DropDraws | None) -> torch.Tensor | None:
        """Residual multipliers of `drops` for this encoder's rates (None in eval mode or without draws)."""
        return drop_path_scales(drops, self.drop_path_rates) if self.training else None

    def class_attention(self, tokens: torch.Tensor) -> torch.Tensor:
        """The [cls] token read out of patch tokens (B', n, D) by the class-attention blocks, before the final
        norm: (B', 1, D)."""
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        for blk in self.blocks_token:
            cls = blk(tokens, cls)
        return cls

    def forward_unnormed_cls(
        self, images: torch.Tensor, keep: KeepIndices | None = None, drops: DropDraws | None = None
    ) -> torch.Tensor:
        """The [cls] output before the final norm (the linear-probe feature): images (B, 3, H, W) -> (B', D)."""
        return self.class_attention(self.forward_tokens(images, keep, drops))[:, 0]

    def forward_features(
        self, images: torch.Tensor, keep: KeepIndices | None = None, drops: DropDraws | None = None
    ) -> torch.Tensor:
        """timm's forward_features: the final normed tokens before pooling, images (B, 3, H, W) -> (B', 1, D) with
        B' = M*B when masked.

        The one token is the [cls] output: the final norm acts on it alone, since nothing reads the patch tokens
        after class attention (timm's CaiT norms them too and returns (B, 1 + N, D); `forward_tokens` gives them
        un-normed). LayerNorm acts per token, so this [cls] equals the reference's norm of concat(cls, tokens)
        at row 0.
        """
        return self.norm(self.class_attention(self.forward_tokens(images, keep, drops)))

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """timm's forward_head: pool the [cls] of `forward_features` (B', 1, D) into the embedding (B', D), returned
        as is with `pre_logits`, else through the `head` slot (the projector: (B', P); identity on a backbone)."""
        embedding = features[:, 0]
        return embedding if pre_logits else self.head(embedding)

    def forward(
        self, images: torch.Tensor, keep: KeepIndices | None = None, drops: DropDraws | None = None
    ) -> torch.Tensor:
        """The embedding: `forward_head(forward_features(images, keep, drops), pre_logits=True)`, (B', D).

        Unlike timm's forward this stops before the `head` slot: there the siamese model keeps its projector (under
        the reference's key names) and applies it itself, while every other caller (the evaluations, the API,
        the reference comparisons) wants the embedding, projector or not. On a bare backbone (identity head) the
        two are the same.
        """
        return self.forward_head(self.forward_features(images, keep, drops), pre_logits=True)


def drop_path_scales(drops: DropDraws | None, rates: torch.Tensor) -> torch.Tensor | None:
    """(B', depth, 2) residual-branch multipliers: 0 where dropped (u < the block's rate), else 1 / keep-probability
    as timm's DropPath scales. `rates`: (depth,) per-block drop rates."""
    if drops is None:
        return None
    u = drops.reshape(-1, *drops.shape[-2:])  # mask-major rows (M*B, depth, 2)
    rates = rates.to(u.device)[:, None]  # (depth, 1)
    return (u >= rates).to(u.dtype) / (1 - rates)


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    """timm Blocks over tokens x (B', n, D). With `scales` (B', depth, 2) each residual branch is multiplied per
    row by its scale in place of the block's own DropPath (which would draw from the global RNG)."""
    if scales is None:
        for blk in blocks:
            x = blk(x)
        return x
    for i, blk in enumerate(blocks):  # timm's Block.forward, with the given keep decisions
        attn = blk.ls1(blk.attn(blk.norm1(x)))
        x = x + attn * scales[:, i, 0, None, None].to(attn.dtype)
        mlp = blk.ls2(blk.mlp(blk.norm2(x)))
        x = x + mlp * scales[:, i, 1, None, None].to(mlp.dtype)
    return x


def init_linear(module: nn.Linear) -> None:
    """Xavier-uniform weight, zero bias (the reference's init for every Linear)."""
    nn.init.xavier_uniform_(module.weight)
    if module.bias is not None:
        nn.init.zeros_(module.bias)
