"""Build a tiny, randomly initialised Hugging Face causal LM from a config (no download).

The architecture is a real :class:`transformers.LlamaForCausalLM` (RMSNorm,
rotary embeddings, SwiGLU MLP; Touvron et al., "LLaMA", 2023) or
:class:`transformers.GPT2LMHeadModel` (Radford et al., 2019), only a few layers
deep, so ``model.generate``, gradient checkpointing and DDP behave exactly as
they would for a full-size model while a training step takes milliseconds on a
CPU. The weights come from the model's own initialiser under ``seed``.
"""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from rl2fx._typing import check_choice, check_range
from rl2fx.logprobs import position_ids_from_mask

__all__ = ["check_model_args", "build_tiny_lm", "build_tiny_critic", "CausalValueModel", "ARCHITECTURES"]

ARCHITECTURES = ("llama", "gpt2")


def check_model_args(
    vocab_size: int,
    *,
    arch: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 64,
) -> None:
    """The checks of :func:`build_tiny_lm`'s settings, without building a model.

    >>> check_model_args(16, hidden_size=30, num_heads=4)
    Traceback (most recent call last):
    ...
    ValueError: hidden_size (30) must be divisible by num_heads (4)
    """
    check_choice("arch", arch, ARCHITECTURES)
    check_range("vocab_size", vocab_size, 1, None)
    check_range("hidden_size", hidden_size, 1, None)
    check_range("num_layers", num_layers, 1, None)
    check_range("num_heads", num_heads, 1, None)
    if intermediate_size is not None:
        check_range("intermediate_size", intermediate_size, 1, None)
    check_range("max_position_embeddings", max_position_embeddings, 1, None)
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")


def build_tiny_lm(
    vocab_size: int,
    *,
    arch: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 64,
    pad_token_id: int = 0,
    bos_token_id: int = 1,
    eos_token_id: int = 2,
    seed: int = 0,
) -> torch.nn.Module:
    """A ``transformers`` causal LM with random weights drawn under ``seed``.

    ``intermediate_size`` defaults to ``2 * hidden_size``. Embeddings are tied to
    the output head (fewer parameters, as in GPT-2). Dropout is off (as usual for
    RL fine-tuning: the log-probs of the update must be those of the sampler).

    >>> m = build_tiny_lm(16, hidden_size=32, num_layers=1, num_heads=2)
    >>> type(m).__name__, m(torch.tensor([[1, 5, 13]])).logits.shape
    ('LlamaForCausalLM', torch.Size([1, 3, 16]))
    >>> a, b = build_tiny_lm(16, seed=3), build_tiny_lm(16, seed=3)
    >>> all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    True
    """
    check_model_args(vocab_size, arch=arch, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                     intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings)
    inter = 2 * hidden_size if intermediate_size is None else intermediate_size
    special = dict(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    if arch == "llama":
        cfg = LlamaConfig(
            vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=inter,
            num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
            max_position_embeddings=max_position_embeddings, tie_word_embeddings=True, **special,
        )
        cls = LlamaForCausalLM
    else:
        cfg = GPT2Config(
            vocab_size=vocab_size, n_embd=hidden_size, n_layer=num_layers, n_head=num_heads, n_inner=inter,
            n_positions=max_position_embeddings, tie_word_embeddings=True, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, **special,
        )
        cls = GPT2LMHeadModel
    # The global RNG is forked so that building a model does not perturb the caller's stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(cfg)
    return model


class CausalValueModel(torch.nn.Module):
    """A value model: a transformers decoder body with a scalar head, :math:`V(x_{\\le t})` per position.

    RL2's and OpenRLHF's critics have this shape (the policy's architecture with the
    LM head replaced by a ``hidden -> 1`` projection). ``forward`` returns
    ``values [batch, seq]`` (float32); the value of the state before response token
    ``t`` is at the position that predicts it, as with the policy's logits.

    >>> critic = build_tiny_critic(16, hidden_size=32, num_layers=1, num_heads=2)
    >>> critic(torch.tensor([[1, 5, 13]])).shape
    torch.Size([1, 3])
    """

    def __init__(self, body: torch.nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.body = body
        self.value_head = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs: object) -> torch.Tensor:
        # Absolute-position bodies (GPT-2) must see the positions generate() sampled at, not the
        # padded column index; rotary bodies get the same values and are unaffected.
        pos = None if attention_mask is None else position_ids_from_mask(attention_mask)
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos,
                           use_cache=False).last_hidden_state
        return self.value_head(hidden).squeeze(-1).float()

    def gradient_checkpointing_enable(self, **kwargs: object) -> None:
        self.body.gradient_checkpointing_enable(**kwargs)


def build_tiny_critic(vocab_size: int, *, seed: int = 0, **kwargs: object) -> CausalValueModel:
    """A :class:`CausalValueModel` on the body of :func:`build_tiny_lm` (same keyword arguments).

    The head starts at zero, so initial values are 0 (a neutral baseline).
    """
    lm = build_tiny_lm(vocab_size, seed=seed, **kwargs)  # type: ignore[arg-type]
    body = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.base_model
    return CausalValueModel(body, lm.config.hidden_size)
