"""An independent, plain-torch re-implementation of the reference ExtreMA forward pass, for numerics tests.

Written from the method's description only (no timm, no `extrema` imports) and kept deliberately naive:
explicit softmax attention, explicit LayerNorm / GELU formulas, Python loops over masks and images.
Every function reads weights from a *reference-format* state dict, keyed as the released checkpoints are
(`module.base_encoder.blocks.0.attn.qkv.weight`, `module.momentum_encoder.head.6.bias`,
`module.predictor.3.weight`, ...), so the tests prove that the project's parameter names mean what the
reference's mean, not just that the shapes line up.
"""

from __future__ import annotations

import math
import re

import torch

STUDENT = "module.base_encoder."
TEACHER = "module.momentum_encoder."
PREDICTOR = "module.predictor."
ENCODER_LN_EPS = 1e-6  # the encoder's LayerNorms
HEAD_LN_EPS = 1e-5  # projector / predictor LayerNorms use torch's default eps


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """(x - mean) / sqrt(biased var + eps) * weight + bias over the last axis."""
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def gelu(x: torch.Tensor) -> torch.Tensor:
    """The exact (erf) GELU."""
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def linear(sd: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    """x @ W^T + b with W, b read from `sd[name + '.weight']`, `sd[name + '.bias']`."""
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def sincos_table(grid_h: int, grid_w: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """The (H*W, dim) fixed position table, one token at a time, written from the stated layout.

    Token n = row * W + col (row-major); its vector is [sin(col*om), cos(col*om), sin(row*om), cos(row*om)]
    with om_i = 1 / temperature^(i / (dim/4)), i = 0 .. dim/4 - 1: the column comes first.
    """
    quarter = dim // 4
    omegas = [1.0 / temperature ** (i / quarter) for i in range(quarter)]
    rows = []
    for n in range(grid_h * grid_w):
        r, c = n // grid_w, n % grid_w
        row = [math.sin(c * om) for om in omegas] + [math.cos(c * om) for om in omegas]
        row += [math.sin(r * om) for om in omegas] + [math.cos(r * om) for om in omegas]
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float64).float()


def patch_tokens(sd: dict, prefix: str, images: torch.Tensor) -> torch.Tensor:
    """Conv2d(3, D, kernel=stride=patch) flattened row-major to (B, N, D), plus the sin-cos table."""
    weight = sd[prefix + "patch_embed.proj.weight"]  # (D, 3, p, p)
    patch = weight.shape[-1]
    x = torch.nn.functional.conv2d(images, weight, sd[prefix + "patch_embed.proj.bias"], stride=patch)
    b, d, gh, gw = x.shape
    x = x.reshape(b, d, gh * gw).transpose(1, 2)  # (B, N, D), token n = row * W + col
    return x + sincos_table(gh, gw, d)[None]


def gather_masks(tokens: torch.Tensor, keep: list[torch.Tensor]) -> torch.Tensor:
    """Stack each mask's kept tokens mask-major: rows [m*B, (m+1)*B) hold mask m. keep[m]: (B, k)."""
    views = []
    for mask in keep:
        for b in range(tokens.shape[0]):
            views.append(tokens[b, mask[b]])  # (k, D)
    return torch.stack(views)  # (M*B, k, D)


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, T, D) -> (B, heads, T, D/heads): head h owns channels [h*hd, (h+1)*hd)."""
    b, t, d = x.shape
    return x.reshape(b, t, num_heads, d // num_heads).transpose(1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Multi-head softmax(q k^T * hd^-0.5) v with explicit softmax; (B, Tq, D), (B, T, D) -> (B, Tq, D)."""
    qh, kh, vh = split_heads(q, num_heads), split_heads(k, num_heads), split_heads(v, num_heads)
    scale = qh.shape[-1] ** -0.5
    scores = qh @ kh.transpose(-1, -2) * scale
    scores = scores - scores.max(dim=-1, keepdim=True).values
    weights = scores.exp() / scores.exp().sum(dim=-1, keepdim=True)
    out = weights @ vh  # (B, heads, Tq, hd)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)


def self_attention_block(sd: dict, name: str, x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Pre-norm block: x + Attn(LN(x)); x + MLP(LN(x)). The fused qkv rows are [q; k; v]."""
    d = x.shape[-1]
    h = layer_norm(x, sd[name + ".norm1.weight"], sd[name + ".norm1.bias"], ENCODER_LN_EPS)
    qkv = linear(sd, name + ".attn.qkv", h)  # (B, T, 3D)
    attn = attention(qkv[..., :d], qkv[..., d : 2 * d], qkv[..., 2 * d :], num_heads)
    x = x + linear(sd, name + ".attn.proj", attn)
    h = layer_norm(x, sd[name + ".norm2.weight"], sd[name + ".norm2.bias"], ENCODER_LN_EPS)
    return x + linear(sd, name + ".mlp.fc2", gelu(linear(sd, name + ".mlp.fc1", h)))


def class_attention_block(sd: dict, name: str, tokens: torch.Tensor, cls: torch.Tensor, num_heads: int):
    """CaiT class attention: u = [cls; tokens]; cls += g1 * CA(LN(u)); cls += g2 * MLP(LN(cls))."""
    u = torch.cat([cls, tokens], dim=1)
    h = layer_norm(u, sd[name + ".norm1.weight"], sd[name + ".norm1.bias"], ENCODER_LN_EPS)
    q = linear(sd, name + ".attn.q", h[:, :1])  # the query comes from the cls position only
    k = linear(sd, name + ".attn.k", h)
    v = linear(sd, name + ".attn.v", h)
    cls = cls + sd[name + ".gamma_1"] * linear(sd, name + ".attn.proj", attention(q, k, v, num_heads))
    h = layer_norm(cls, sd[name + ".norm2.weight"], sd[name + ".norm2.bias"], ENCODER_LN_EPS)
    return cls + sd[name + ".gamma_2"] * linear(sd, name + ".mlp.fc2", gelu(linear(sd, name + ".mlp.fc1", h)))


def count_blocks(sd: dict, prefix: str, group: str) -> int:
    """How many `prefix + group + '.<i>.'` blocks the state dict holds."""
    pattern = re.compile(re.escape(prefix + group) + r"\.(\d+)\.")
    return 1 + max(int(m.group(1)) for key in sd for m in [pattern.match(key)] if m)


def encoder(sd: dict, prefix: str, images: torch.Tensor, num_heads: int, keep: list | None = None) -> torch.Tensor:
    """The encoder embedding: (B, D) for the full view, (M*B, D) mask-major when `keep` is given."""
    x = patch_tokens(sd, prefix, images)
    if keep is not None:
        x = gather_masks(x, keep)
    for i in range(count_blocks(sd, prefix, "blocks")):
        x = self_attention_block(sd, f"{prefix}blocks.{i}", x, num_heads)
    cls = sd[prefix + "cls_token"].expand(x.shape[0], 1, -1)
    for i in range(count_blocks(sd, prefix, "blocks_token")):
        cls = class_attention_block(sd, f"{prefix}blocks_token.{i}", x, cls, num_heads)
    out = layer_norm(torch.cat([cls, x], dim=1), sd[prefix + "norm.weight"], sd[prefix + "norm.bias"], ENCODER_LN_EPS)
    return out[:, 0]


def projector(sd: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    """head.0 Linear -> head.1 LN -> GELU -> head.3 Linear -> head.4 LN -> GELU -> head.6 Linear."""
    for lin, ln in (("head.0", "head.1"), ("head.3", "head.4")):
        x = linear(sd, prefix + lin, x)
        x = gelu(layer_norm(x, sd[prefix + ln + ".weight"], sd[prefix + ln + ".bias"], HEAD_LN_EPS))
    return linear(sd, prefix + "head.6", x)


def predictor(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """predictor.0 Linear -> predictor.1 LN -> GELU -> predictor.3 Linear."""
    x = linear(sd, PREDICTOR + "0", x)
    x = gelu(layer_norm(x, sd[PREDICTOR + "1.weight"], sd[PREDICTOR + "1.bias"], HEAD_LN_EPS))
    return linear(sd, PREDICTOR + "3", x)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm."""
    return x / x.norm(dim=-1, keepdim=True)


def byol_loss(pred_per_mask: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """Loop over masks: mean over the batch of ||norm(q) - norm(k)||^2, then averaged over the masks."""
    k = normalize(target)
    total = 0.0
    for pred in pred_per_mask:
        total = total + ((normalize(pred) - k) ** 2).sum(dim=-1).mean()
    return total / len(pred_per_mask)


def infonce_loss(
    pred_per_mask: list[torch.Tensor], all_keys: torch.Tensor, rank: int, temperature: float
) -> torch.Tensor:
    """Loop over masks: cross-entropy of q against every rank's keys, label = rank*B + b, times 2T; mask mean.

    all_keys: (world*B, P), the keys of all ranks concatenated in rank order.
    """
    k = normalize(all_keys)
    total = 0.0
    for pred in pred_per_mask:
        batch = pred.shape[0]
        logits = normalize(pred) @ k.T / temperature  # (B, world*B)
        labels = torch.arange(batch) + rank * batch
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        total = total + (-log_prob[torch.arange(batch), labels]).mean() * (2 * temperature)
    return total / len(pred_per_mask)


def siamese_forward(
    sd: dict, student_view: torch.Tensor, teacher_view: torch.Tensor, keep: list[torch.Tensor], num_heads: int
) -> dict:
    """The reference training forward (BYOL loss), mask by mask.

    Returns student_embedding (M*B, D), teacher_embedding (B, D), pred (M*B, P), target (B, P), loss.
    """
    teacher_embedding = encoder(sd, TEACHER, teacher_view, num_heads)
    target = projector(sd, TEACHER, teacher_embedding)
    embeddings, preds = [], []
    for mask in keep:
        emb = encoder(sd, STUDENT, student_view, num_heads, keep=[mask])  # (B, D)
        embeddings.append(emb)
        preds.append(predictor(sd, projector(sd, STUDENT, emb)))
    return {
        "student_embedding": torch.cat(embeddings),
        "teacher_embedding": teacher_embedding,
        "pred": torch.cat(preds),
        "pred_per_mask": preds,
        "target": target,
        "loss": byol_loss(preds, target),
    }


def ema_update(sd: dict, momentum: float, trainable: set[str] | None = None) -> dict:
    """A new state dict with every teacher tensor t <- m * t + (1 - m) * s from its student twin.

    `trainable`: the teacher suffixes that are parameters (buffers such as the position table are left alone);
    None updates every teacher entry.
    """
    out = dict(sd)
    for key, t in sd.items():
        if not key.startswith(TEACHER):
            continue
        suffix = key[len(TEACHER) :]
        if trainable is not None and suffix not in trainable:
            continue
        out[key] = momentum * t + (1.0 - momentum) * sd[STUDENT + suffix]
    return out
