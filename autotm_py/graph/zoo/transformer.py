"""A decoder-only (language-model style) Transformer written with plain ops.

Attention is spelled out with ``matmul`` + ``softmax`` (no
``F.scaled_dot_product_attention`` / ``nn.MultiheadAttention``) so that the
same kernels, and so the same intermediate tensors, appear on every device.
Layers are pre-norm: ``x + Drop(Attn(LN(x)))`` then ``x + Drop(FFN(LN(x)))``,
with a causal mask, a final LayerNorm and a projection to the vocabulary.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["SelfAttention", "TransformerLayer", "TransformerLM", "transformer"]


class SelfAttention(nn.Module):
    """Causal multi-head self-attention."""

    def __init__(self, d_model: int, heads: int, dropout: float) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model {d_model} is not divisible by heads {heads}.")
        self.heads = heads
        self.d_head = d_model // heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.attn_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        qkv = self.qkv(x).view(b, s, 3, self.heads, self.d_head).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (b, heads, s, d_head)
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(self.d_head))
        mask = torch.ones(s, s, dtype=torch.bool, device=x.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
        attn = self.attn_drop(torch.softmax(scores, dim=-1))
        out = torch.matmul(attn, v).transpose(1, 2).reshape(b, s, d)
        return self.proj(out)


class TransformerLayer(nn.Module):
    """Pre-norm block: self-attention and a ReLU feed-forward, each with a residual."""

    def __init__(self, d_model: int, heads: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, heads, dropout)
        self.drop1 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(
            nn.Linear(d_model, d_ff),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(d_ff, d_model),
        )
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop1(self.attn(self.norm1(x)))
        return x + self.drop2(self.ff(self.norm2(x)))


class TransformerLM(nn.Module):
    """Token + learned position embeddings, ``layers`` blocks, LayerNorm, vocab projection.

    Input: int64 tokens ``(batch, seq)`` with ``seq <= max_len``;
    output: logits ``(batch, seq, vocab)``.
    """

    def __init__(
        self,
        vocab: int = 20000,
        d_model: int = 512,
        layers: int = 8,
        heads: int = 8,
        d_ff: int = 2048,
        dropout: float = 0.1,
        max_len: int = 1024,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.max_len = max_len
        self.tok_emb = nn.Embedding(vocab, d_model)
        self.pos_emb = nn.Embedding(max_len, d_model)
        self.drop = nn.Dropout(dropout)
        self.layers = nn.Sequential(
            *(TransformerLayer(d_model, heads, d_ff, dropout) for _ in range(layers))
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        s = tokens.shape[1]
        if s > self.max_len:
            raise ValueError(f"sequence length {s} exceeds max_len {self.max_len}.")
        pos = torch.arange(s, device=tokens.device)
        x = self.tok_emb(tokens) * math.sqrt(self.d_model) + self.pos_emb(pos)
        x = self.layers(self.drop(x))
        return self.head(self.norm(x))


def transformer(vocab: int = 20000, seq_len: int = 150) -> TransformerLM:
    """The zoo's Transformer (8 layers, d_model 512, 8 heads, d_ff 2048, dropout 0.1)."""
    return TransformerLM(vocab=vocab, max_len=max(1024, seq_len))
