"""Tiny transformers causal LMs of several architectures, built from configs (nothing downloaded)."""

from __future__ import annotations

import torch

VOCAB = 97
PROMPT, NEW = 6, 5
ARCHS = ["gpt2", "opt", "gpt_neox", "llama", "qwen2", "gemma", "gemma2"]


def build(arch: str, *, seed: int = 0) -> torch.nn.Module:
    """A 2-layer, hidden-32 causal LM of ``arch`` (float32, eval mode, no dropout)."""
    import transformers as t

    ids = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    dec = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=64)
    gqa = dict(dec, num_key_value_heads=1)
    makers = {
        "gpt2": lambda: t.GPT2LMHeadModel(t.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.0,
                                                       embd_pdrop=0.0, attn_pdrop=0.0, **ids)),
        "opt": lambda: t.OPTForCausalLM(t.OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                    ffn_dim=64, max_position_embeddings=64, word_embed_proj_dim=32,
                                                    dropout=0.0, attention_dropout=0.0, **ids)),
        "gpt_neox": lambda: t.GPTNeoXForCausalLM(t.GPTNeoXConfig(**dec, hidden_dropout=0.0, attention_dropout=0.0,
                                                                 **ids)),
        "llama": lambda: t.LlamaForCausalLM(t.LlamaConfig(**dec, num_key_value_heads=2, **ids)),
        "qwen2": lambda: t.Qwen2ForCausalLM(t.Qwen2Config(**gqa, **ids)),
        "gemma": lambda: t.GemmaForCausalLM(t.GemmaConfig(**gqa, head_dim=16, **ids)),
        "gemma2": lambda: t.Gemma2ForCausalLM(t.Gemma2Config(**gqa, head_dim=16, sliding_window=16, **ids)),
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = makers[arch]()
    return model.eval()


def left_padded_prompts(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three prompts of 6, 5 and 3 real tokens, left-padded to 6 (ragged padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, PROMPT), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :1] = 0
    mask[2, :3] = 0
    return ids.masked_fill(mask == 0, 0), mask
