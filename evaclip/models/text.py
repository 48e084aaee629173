"""CLIP text tower: causal transformer, EOT pooling, projection; OpenAI / open_clip weight layout.

Architecture only. Shapes: B batch, L context length, D width, H heads, Dh head dim, E embed dim.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import Attend
from .registry import TextCfg


class TextAttention(nn.Module):
    """Causal self-attention with nn.MultiheadAttention's parameter names (in_proj_weight, out_proj)."""

    def __init__(self, width: int, heads: int, attend: Attend):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        self.attend = attend

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        B, L, D = x_BLD.shape
        qkv = F.linear(x_BLD, self.in_proj_weight, self.in_proj_bias).view(B, L, 3, self.heads, self.head_dim)
        if self.attend.layout == "BHND":
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            out_BLD = self.attend(q, k, v, causal=True).transpose(1, 2).reshape(B, L, D)
        else:
            out_BLD = self.attend(*qkv.unbind(2), causal=True).reshape(B, L, D)
        return self.out_proj(out_BLD)


class TextBlock(nn.Module):
    def __init__(self, cfg: TextCfg, attend: Attend):
        super().__init__()
        D = cfg.width
        self.ln_1 = nn.LayerNorm(D, eps=cfg.ln_eps)
        self.attn = TextAttention(D, cfg.heads, attend)
        self.ln_2 = nn.LayerNorm(D, eps=cfg.ln_eps)
        hidden = int(D * cfg.mlp_ratio)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(D, hidden))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(hidden, D))

    def forward(self, x_BLD):
        x_BLD = x_BLD + self.attn(self.ln_1(x_BLD))
        return x_BLD + self.mlp(self.ln_2(x_BLD))


class Transformer(nn.Module):
    def __init__(self, cfg: TextCfg, attend: Attend):
        super().__init__()
        self.resblocks = nn.ModuleList([TextBlock(cfg, attend) for _ in range(cfg.layers)])
        self.grad_checkpointing = False

    def forward(self, x_BLD):
        for blk in self.resblocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x_BLD = checkpoint(blk, x_BLD, use_reentrant=False)
            else:
                x_BLD = blk(x_BLD)
        return x_BLD


class TextTransformer(nn.Module):
    """Token ids B x L -> text embeddings B x E, pooled at the EOT token (the highest token id)."""

    def __init__(self, cfg: TextCfg, embed_dim: int, attend: Attend):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg, attend)
        self.ln_final = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, embed_dim))
        self._init_weights()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def _init_weights(self):  # CLIP's initialisation
        D, layers = self.cfg.width, self.cfg.layers
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        proj_std, attn_std, fc_std = (D ** -0.5) * ((2 * layers) ** -0.5), D ** -0.5, (2 * D) ** -0.5
        for blk in self.transformer.resblocks:
            nn.init.normal_(blk.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(blk.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(blk.attn.out_proj.bias)
            nn.init.normal_(blk.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(blk.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=D ** -0.5)

    def forward(self, tokens_BL: torch.Tensor) -> torch.Tensor:
        L = tokens_BL.shape[1]
        if L > self.cfg.context_length:
            raise ValueError(f"text of {L} tokens is longer than the context length {self.cfg.context_length}")
        x_BLD = self.token_embedding(tokens_BL) + self.positional_embedding[:L]
        x_BLD = self.ln_final(self.transformer(x_BLD))
        eot_B = tokens_BL.argmax(dim=-1)
        return x_BLD[torch.arange(x_BLD.shape[0], device=x_BLD.device), eot_B] @ self.text_projection
