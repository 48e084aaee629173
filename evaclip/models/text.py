"""CLIP text tower: causal transformer, EOT pooling, projection; OpenAI / open_clip weight layout.

Architecture only. Shapes: see the legend in docs/ARCHITECTURE.md (B batch, L context length, D width, H heads,
F per-head feature dim (the local ``Dh``), E embed dim).

Fast path (exact): the tower pools at the EOT token, so the last block runs its query, out_proj, residual, ln_2 and
MLP on the EOT row of each sample only (keys/values still come from every token), and ln_final + projection on B x D.
"""
from __future__ import annotations

from typing import Optional

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
        """Every token attends causally: B x L x D -> B x L x D."""
        B, L, D = x_BLD.shape
        qkv = F.linear(x_BLD, self.in_proj_weight, self.in_proj_bias).view(B, L, 3, self.heads, self.head_dim)
        if self.attend.layout == "BHND":
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            out_BLD = self.attend(q, k, v, causal=True).transpose(1, 2).reshape(B, L, D)
        else:
            out_BLD = self.attend(*qkv.unbind(2), causal=True).reshape(B, L, D)
        return self.out_proj(out_BLD)

    def forward_rows(self, x_BLD: torch.Tensor, row_B: torch.Tensor) -> torch.Tensor:
        """Only the query at position ``row_B[b]`` of each sample: B x L x D -> B x D.

        Keys and values come from every token; the query sees positions <= its own (the causal mask's row), so the
        output equals row ``row_B[b]`` of ``forward`` at 1/L of the query and out_proj cost.
        """
        B, L, D = x_BLD.shape
        H, Dh = self.heads, self.head_dim
        rows = torch.arange(B, device=x_BLD.device)
        q_BD = F.linear(x_BLD[rows, row_B], self.in_proj_weight[:D], self.in_proj_bias[:D])
        kv = F.linear(x_BLD, self.in_proj_weight[D:], self.in_proj_bias[D:]).view(B, L, 2, H, Dh)
        keep_B11L = (torch.arange(L, device=x_BLD.device) <= row_B[:, None]).view(B, 1, 1, L)
        if self.attend.layout == "BHND":
            k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
            out_BD = self.attend(q_BD.view(B, H, 1, Dh), k, v, mask=keep_B11L).reshape(B, D)
        else:
            out_BD = self.attend(q_BD.view(B, 1, H, Dh), *kv.unbind(2), mask=keep_B11L).reshape(B, D)
        return self.out_proj(out_BD)


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

    def forward(self, x_BLD: torch.Tensor, row_B: Optional[torch.Tensor] = None) -> torch.Tensor:
        """B x L x D -> B x L x D; with ``row_B``, only the output row ``row_B[b]`` of each sample: B x D."""
        if row_B is None:
            x_BLD = x_BLD + self.attn(self.ln_1(x_BLD))
            return x_BLD + self.mlp(self.ln_2(x_BLD))
        x_BD = x_BLD[torch.arange(x_BLD.shape[0], device=x_BLD.device), row_B]
        x_BD = x_BD + self.attn.forward_rows(self.ln_1(x_BLD), row_B)
        return x_BD + self.mlp(self.ln_2(x_BD))


class Transformer(nn.Module):
    def __init__(self, cfg: TextCfg, attend: Attend):
        super().__init__()
        self.resblocks = nn.ModuleList([TextBlock(cfg, attend) for _ in range(cfg.layers)])
        self.grad_checkpointing = False

    def forward(self, x_BLD: torch.Tensor, row_B: Optional[torch.Tensor] = None) -> torch.Tensor:
        """All blocks: B x L x D -> B x L x D; with ``row_B`` the last block outputs only those rows: B x D."""
        last = len(self.resblocks) - 1
        for i, blk in enumerate(self.resblocks):
            rows = row_B if i == last else None
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x_BLD = checkpoint(blk, x_BLD, rows, use_reentrant=False)
            else:
                x_BLD = blk(x_BLD, rows)
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

    def _embed(self, tokens_BL: torch.Tensor) -> torch.Tensor:
        if tokens_BL.dim() != 2:
            raise ValueError(f"text tokens must be B x L, got shape {tuple(tokens_BL.shape)}")
        L = tokens_BL.shape[1]
        if L > self.cfg.context_length:
            raise ValueError(f"text of {L} tokens is longer than the context length {self.cfg.context_length}")
        return self.token_embedding(tokens_BL) + self.positional_embedding[:L]

    def forward_tokens(self, tokens_BL: torch.Tensor) -> torch.Tensor:
        """Features of every token after ln_final (not projected): B x L x D. The full computation."""
        return self.ln_final(self.transformer(self._embed(tokens_BL)))

    def forward(self, tokens_BL: torch.Tensor) -> torch.Tensor:
        """Token ids B x L -> projected features B x E at the EOT token (the last block runs on that row only)."""
        x_BLD = self._embed(tokens_BL)
        if len(self.transformer.resblocks) == 0:  # no block to cut: pool the embeddings
            x_BD = x_BLD[torch.arange(x_BLD.shape[0], device=x_BLD.device), tokens_BL.argmax(dim=-1)]
        else:
            x_BD = self.transformer(x_BLD, tokens_BL.argmax(dim=-1))
        return self.ln_final(x_BD) @ self.text_projection
