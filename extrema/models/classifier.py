"""The finetune classifier: the encoder's self-attention blocks with a mean-pooled Linear head (BEiT's recipe)."""

from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from torch import nn

from extrema.models.encoder import DropDraws, ExtremaViT, LayerNorm6, drop_path_scales, run_blocks

# Pretrained keys FinetuneViT has no place for, and its own keys a pretrained encoder does not hold.
FINETUNE_DROPPED_KEYS = ("cls_token", "blocks_token.", "norm.")
FINETUNE_NEW_KEYS = ("fc_norm.", "head.")


class FinetuneViT(nn.Module):
    """The BEiT-style finetune model: the encoder's patch embedding, positions and self-attention blocks,
    no [cls] and no class-attention blocks; mean-pooled patch tokens -> fc_norm -> Linear head. The position
    embedding is trained (no weight decay, in the patch embedding's layer-decay group), as the reference's.

    Parameter names equal the encoder's (`patch_embed.*`, `blocks.*`) so pretrained weights load by name.
    The token path repeats the encoder's three-line embedding rather than keeping the whole encoder (whose
    [cls], class-attention blocks and final norm would then be dead parameters in every state dict).
    """

    def __init__(
        self, encoder: ExtremaViT, num_classes: int, head_init_scale: float = 0.001, train_pos_embed: bool = True
    ) -> None:
        super().__init__()
        self.embed_dim = encoder.embed_dim
        self.num_classes = num_classes
        self.patch_embed = encoder.patch_embed
        # A parameter either way (same state-dict key as the encoder's buffer); trained as BEiT's learnable
        # position embedding, initialised from the pretrained table, unless frozen. A frozen one is left out
        # of the optimizer (timm's groups skip parameters without grad).
        self.pos_embed = nn.Parameter(encoder.pos_embed.detach().clone(), requires_grad=train_pos_embed)
        self.pos_drop = encoder.pos_drop
        self.blocks = encoder.blocks
        # The blocks' stochastic-depth rates, for per-image draws. A plain tensor, not a buffer: the model holds
        # no buffers, which is what lets DDP skip broadcasting them before every forward.
        self.drop_path_rates = encoder.drop_path_rates.detach().clone()
        self.fc_norm = LayerNorm6(self.embed_dim)
        self.head = new_classifier(self.embed_dim, num_classes, head_init_scale)

    def no_weight_decay(self) -> set[str]:
        """Names without weight decay besides 1-D tensors (timm's layer-decay groups read this)."""
        return {"pos_embed"}

    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer ids for timm's layer-wise lr decay: stem 0, block i -> i + 1, and (unmatched, so last) fc_norm
        with the head at depth + 1, as BEiT counts: the head gets decay ** 0, the last block decay ** 1."""
        return {"stem": r"^pos_embed|patch_embed", "blocks": r"^blocks\.(\d+)"}

    def forward_features(self, images: torch.Tensor, drops: DropDraws | None = None) -> torch.Tensor:
        """timm's forward_features: the tokens before pooling, images (B, 3, H, W) -> patch tokens after the
        self-attention blocks (B, N, D). Un-normed, as in timm's ViT with fc_norm: the norm comes after the pooling.

        `drops` (B, depth, 2): each image's own stochastic-depth draws (see `DropDraws`), so that an image's
        drop decisions do not depend on the batch it shares; used in training only (eval mode never drops).
        None: timm's DropPath draws from the global RNG, per batch, in training.
        """
        x = self.pos_drop(self.patch_embed(images) + self.pos_embed.to(images.dtype))  # (B, N, D)
        scales = drop_path_scales(drops, self.drop_path_rates) if self.training else None
        return run_blocks(self.blocks, x, scales)

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """timm's forward_head: mean-pool the tokens (B, N, D), fc_norm -> (B, D), returned as is with `pre_logits`,
        else the class logits (B, num_classes)."""
        pooled = self.fc_norm(tokens.mean(dim=1))
        return pooled if pre_logits else self.head(pooled)

    def forward(self, images: torch.Tensor, drops: DropDraws | None = None) -> torch.Tensor:
        """Class logits: `forward_head(forward_features(images, drops))`, (B, num_classes)."""
        return self.forward_head(self.forward_features(images, drops))


def new_classifier(dim: int, num_classes: int, init_scale: float) -> nn.Linear:
    """A classifier as BEiT initialises it: trunc-normal(0.02) weight, zero bias, both times `init_scale`."""
    head = nn.Linear(dim, num_classes)
    trunc_normal_(head.weight, std=0.02)
    nn.init.zeros_(head.bias)
    with torch.no_grad():
        head.weight.mul_(init_scale)
    return head
