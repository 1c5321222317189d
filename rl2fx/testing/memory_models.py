"""Small models for the memory tests and benchmark, built locally from configs (no downloads).

>>> model = tiny_llama(hidden_size=32, num_layers=2, vocab_size=64, max_positions=16)
>>> type(model).__name__, model.config.num_hidden_layers
('LlamaForCausalLM', 2)
>>> len(block_stack(width=8, depth=3).blocks)
3
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BlockStack", "block_stack", "tiny_llama"]


def tiny_llama(
    hidden_size: int = 64,
    num_layers: int = 2,
    vocab_size: int = 256,
    max_positions: int = 128,
    *,
    intermediate_size: int | None = None,
    head_dim: int = 64,
    attn_implementation: str = "sdpa",
    seed: int = 0,
):
    """A randomly initialised ``transformers.LlamaForCausalLM`` in training mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = max(1, hidden_size // head_dim)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        attn_implementation=attn_implementation,
        use_cache=False,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.train()


class BlockStack(nn.Module):
    """Plain residual MLP blocks in an ``nn.ModuleList`` (the generic checkpointing path)."""

    def __init__(self, width: int, depth: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden), nn.GELU(),
                          nn.Dropout(dropout), nn.Linear(hidden, width))
            for _ in range(depth)
        )
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return self.head(x).squeeze(-1)


def block_stack(width: int = 32, depth: int = 4, hidden: int | None = None, dropout: float = 0.0,
                seed: int = 0) -> BlockStack:
    """A :class:`BlockStack` with deterministic initialisation, in training mode."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = BlockStack(width, depth, hidden or 4 * width, dropout)
    return model.train()
