"""The two text classifiers: ``encoder(input_ids, attention_mask) -> sentence embedding`` and a
head on top. ``forward`` returns ``(logits, embedding)`` like the image model, so the training
loop, the export and drift monitoring treat both alike.

a. ``TransformerEncoder``: a small pre-LayerNorm transformer written out here (cf. nanoGPT's
   Block) rather than ``nn.TransformerEncoder``, whose inference fast path and nested tensors the
   ONNX exporter does not need to see; trained from scratch.
b. ``MiniLMEncoder``: the pretrained all-MiniLM-L6-v2 (a 6-layer BERT), frozen or fine-tuned.
Both mean-pool the last layer over real tokens (the mask), which is how MiniLM's sentence
embeddings are defined, so padding never changes a text's embedding.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TransformerConfig:
    """Everything needed to rebuild the small transformer; saved in the manifest."""

    vocab_size: int
    num_classes: int
    max_length: int = 128
    d_model: int = 128
    layers: int = 2
    heads: int = 4
    ff_dim: int = 256
    dropout: float = 0.1
    pad_id: int = 0

    def __post_init__(self) -> None:
        if self.d_model % self.heads:
            raise ValueError(f"d_model {self.d_model} is not a multiple of heads {self.heads}")
        if self.num_classes < 2 or self.vocab_size < 2:
            raise ValueError("need num_classes >= 2 and vocab_size >= 2")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "transformer", **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TransformerConfig":
        return cls(**{k: v for k, v in data.items() if k != "kind"})


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` [N, L, D] over positions where ``mask`` [N, L] is 1."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class Block(nn.Module):
    """Pre-LN self-attention + GELU MLP, each with a residual (as in GPT-2 / nanoGPT)."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, cfg.ff_dim), nn.GELU(),
                                 nn.Linear(cfg.ff_dim, cfg.d_model))
        self.dropout = nn.Dropout(cfg.dropout)
        self.attn_dropout = cfg.dropout

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        n, length, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (t.view(n, length, self.heads, d // self.heads).transpose(1, 2)
                   for t in (q, k, v))
        # keep [N, 1, 1, L]: every query may look at every real key, never at padding.
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=keep, dropout_p=self.attn_dropout if self.training else 0.0)
        x = x + self.dropout(self.proj(y.transpose(1, 2).reshape(n, length, d)))
        return x + self.dropout(self.mlp(self.ln2(x)))


class TransformerEncoder(nn.Module):
    """Token + learnt position embeddings -> pre-LN blocks -> LayerNorm -> masked mean."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_id)
        self.positions = nn.Parameter(torch.zeros(1, cfg.max_length, cfg.d_model))
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln = nn.LayerNorm(cfg.d_model)
        self.dim = cfg.d_model
        self.apply(self._init)
        nn.init.normal_(self.positions, std=0.02)

    @staticmethod
    def _init(module: nn.Module) -> None:
        # GPT-2's N(0, 0.02): PyTorch's default uniform init for Linear trains slower here.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        x = self.dropout(self.tokens(input_ids) + self.positions[:, :length])
        keep = attention_mask.bool()[:, None, None, :]
        for block in self.blocks:
            x = block(x, keep)
        return masked_mean(self.ln(x), attention_mask)


class MiniLMEncoder(nn.Module):
    """all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide) mean-pooled: its sentence embedding."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        from transformers import BertModel
        from transformers.utils import logging as hf_logging

        # "sdpa" attention exports with dynamic batch and sequence axes (measured; "eager"
        # works too, slower). No pooler: the [CLS] pooler is unused by sentence embeddings, and
        # its weights in the checkpoint would only print a load report.
        verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()  # a "Loading weights" bar per load, even in logs
        try:
            self.bert = BertModel.from_pretrained(str(path), attn_implementation="sdpa",
                                                  add_pooling_layer=False)
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
        self.dim = self.bert.config.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return masked_mean(hidden, attention_mask)


class ClassifierHead(nn.Module):
    """Dropout + linear on the sentence embedding; returns ``(logits, embedding)`` so it can be
    trained alone on cached embeddings with the same loop."""

    def __init__(self, dim: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.linear(self.dropout(embedding)), embedding


class TextClassifier(nn.Module):
    """``(input_ids, attention_mask) -> (logits [N, K], embedding [N, D])``."""

    def __init__(self, encoder: nn.Module, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = ClassifierHead(encoder.dim, num_classes, dropout)
        self.frozen = False

    def freeze_encoder(self) -> None:
        """No gradients into the encoder, and no dropout in it while the head trains."""
        self.frozen = True
        self.encoder.requires_grad_(False)
        self.encoder.eval()

    def train(self, mode: bool = True) -> "TextClassifier":
        super().train(mode)
        if self.frozen:
            self.encoder.eval()
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.encoder(input_ids, attention_mask))


def build_transformer(cfg: TransformerConfig) -> TextClassifier:
    """The from-scratch classifier (random init: seed torch first for reproducible weights)."""
    return TextClassifier(TransformerEncoder(cfg), cfg.num_classes, cfg.dropout)


def build_minilm(path: str | Path, num_classes: int, dropout: float = 0.1,
                 freeze: bool = True) -> TextClassifier:
    """MiniLM + a new head; ``freeze`` stops gradients into the encoder (and keeps it in eval
    mode when the classifier trains: no dropout inside a frozen feature extractor)."""
    model = TextClassifier(MiniLMEncoder(path), num_classes, dropout)
    if freeze:
        model.freeze_encoder()
    return model
