"""Shared pieces of the FSDP2/DDP tests, and the worker they launch with ``torchrun``.

``python -m torch.distributed.run --nproc_per_node 2 tests/_fsdp_worker.py MODE OUT``:

- ``update STRATEGY OUT``: ``STEPS`` PPO steps on this rank's half of :func:`global_batch`, its
  advantages whitened with global statistics;
  rank 0 writes the full parameters and the metrics to ``OUT`` (plus the message of
  ``wrap_policy(..., "single")`` under 2 processes).
- ``checkpoint DIR``: one FSDP2 step, :func:`rl2fx.distributed.save_sharded` to ``DIR/ckpt``
  and the gathered full state to ``DIR/full.pt``; one more step (the uninterrupted run); then a
  new model and optimizer load ``DIR/ckpt`` and take that step again (the resumed run). Rank 0
  writes both runs' parameters to ``DIR/runs.pt``.
- ``fail``: rank 1 raises while rank 0 starts a training step (which waits for rank 1).

Everything is float32 and deterministic: the model and the batch come from fixed seeds.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from rl2fx.distributed import (
    generate_kwargs,
    load_sharded,
    reshard,
    save_sharded,
    unwrap,
    wrap_policy,
)
from rl2fx.returns import whiten
from rl2fx.step import compute_logprobs, make_ppo_loss, train_step

STEPS = 2
ROWS, PROMPT, RESP, VOCAB = 8, 4, 5, 64
LR = 1e-2


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    """A 2-layer, hidden-32, vocab-64 Llama from a config (nothing downloaded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg)


def global_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """8 sequences with ragged responses (the two halves hold different token counts)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (ROWS, PROMPT + RESP), generator=g)
    lengths = torch.tensor([5, 1, 3, 2, 5, 5, 4, 5])  # 11 tokens in rows 0-3, 19 in rows 4-7
    rmask = (torch.arange(RESP) < lengths[:, None]).float()
    attn = torch.cat([torch.ones(ROWS, PROMPT, dtype=torch.long), rmask.long()], dim=1)
    b = {"input_ids": ids, "attention_mask": attn, "response_ids": ids[:, PROMPT:], "response_mask": rmask}
    with torch.no_grad():
        old, _ = compute_logprobs(tiny_llama(seed), b)
        ref, _ = compute_logprobs(tiny_llama(seed + 1), b)
    # old log-probs a little off the policy so that some ratios leave the clip range
    b["old_logprobs"] = old + 0.3 * torch.randn(old.shape, generator=g)
    b["ref_logprobs"] = ref
    b["advantages"] = (torch.randn(rmask.shape, generator=g) + 0.5) * rmask
    return b


def whitened_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """:func:`global_batch` with its advantages whitened over the whole batch (one process)."""
    b = global_batch(seed)
    b["advantages"] = whiten(b["advantages"], b["response_mask"])
    return b


def loss_fn() -> Any:
    return make_ppo_loss(clip=0.2, kl_coef=0.1, entropy_coef=0.01, agg_mode="token-mean")


def step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: dict[str, torch.Tensor], i: int,
         micro_batch_size: int) -> dict[str, Any]:
    return train_step(model, opt, batch, loss_fn=loss_fn(), max_grad_norm=1.0, micro_batch_size=micro_batch_size,
                      step=i)


def single_process(steps: int = STEPS) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """The reference: the whole batch in one process (advantages whitened), 2 micro-batches of 4 rows."""
    model = tiny_llama()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    b = whitened_batch()
    metrics = [step(model, opt, b, i, ROWS // 2) for i in range(steps)]
    return [p.detach().clone() for p in model.parameters()], metrics


def _local(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    rank, world = dist.get_rank(), dist.get_world_size()
    share = ROWS // world
    return {k: v[rank * share:(rank + 1) * share] for k, v in b.items()}


def full_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter gathered in full on the CPU (a collective: all ranks call it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _count_reduce_scatters() -> list[None]:
    """Record each gradient reduce-scatter FSDP2 issues from now on (it calls ``dist.reduce_scatter_single``)."""
    calls: list[None] = []
    inner = dist.reduce_scatter_single

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(None)
        return inner(*args, **kwargs)

    dist.reduce_scatter_single = counted
    return calls


def _update(strategy: str, out: Path) -> None:
    try:
        wrap_policy(tiny_llama(), "single")
        single_error = ""
    except ValueError as e:
        single_error = str(e)
    bare = tiny_llama()
    try:
        train_step(bare, torch.optim.Adam(bare.parameters()), _local(global_batch()), loss_fn=loss_fn())
        bare_error = ""
    except ValueError as e:
        bare_error = str(e)
    model = wrap_policy(tiny_llama(), strategy, device="cpu")
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    b = _local(global_batch())
    uneven_error = ""
    if strategy == "fsdp":  # rank 0: 4 rows (2 micro-batches), rank 1: 2 rows (1 micro-batch)
        cut = b if dist.get_rank() == 0 else {k: v[:2] for k, v in b.items()}
        try:
            train_step(model, opt, cut, loss_fn=loss_fn(), micro_batch_size=2)
        except ValueError as e:
            uneven_error = str(e)
    # whitened with the mean and variance of the global batch (one all-reduce)
    b["advantages"] = whiten(b["advantages"], b["response_mask"], group=dist.group.WORLD)
    # 4 rows per rank, micro-batches of 2: two micro-batches, gradient sync on the second only
    scatters = _count_reduce_scatters() if strategy == "fsdp" else []
    metrics = [step(model, opt, b, i, 2) for i in range(STEPS)]
    params = full_params(model)
    # rollout with the sharded model: ranks sample different prompts; synced_gpus keeps their passes in step
    prompts = b["input_ids"][:, :PROMPT]
    gen = unwrap(model).generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=3,
                                 do_sample=False, pad_token_id=0, **generate_kwargs(model))
    reshard(model)
    if dist.get_rank() == 0:
        torch.save({"params": params, "metrics": metrics, "single_error": single_error, "bare_error": bare_error, "uneven_error": uneven_error,
                    "generated": tuple(gen.shape), "reduce_scatters": len(scatters)}, out)


def _checkpoint(out: Path) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model = wrap_policy(tiny_llama(), "fsdp", device="cpu")
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    b = _local(global_batch())
    step(model, opt, b, 0, 2)
    save_sharded(out / "ckpt", model, opt, extra_state={"step": 1, "kl_coef": torch.tensor(0.125)})
    # copies: the optimizer's step counters are host tensors that the next step increments in place
    full = copy.deepcopy(get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True)))
    step(model, opt, b, 1, 2)
    uninterrupted = full_params(model)
    # the resumed run: a new model with other weights and a new optimizer, filled from the files alone
    model = wrap_policy(tiny_llama(seed=7), "fsdp", device="cpu")
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    extra = load_sharded(out / "ckpt", model, opt)
    step(model, opt, b, int(extra["step"]), 2)
    resumed = full_params(model)
    if dist.get_rank() == 0:
        torch.save({"model": full[0], "optim": full[1]}, out / "full.pt")
        torch.save({"uninterrupted": uninterrupted, "resumed": resumed, "extra": extra}, out / "runs.pt")


def _fail() -> None:
    """Rank 1 raises while rank 0 waits for it in a collective: both must exit, not hang."""
    model = wrap_policy(tiny_llama(), "fsdp", device="cpu")
    if dist.get_rank() == 1:
        raise ValueError("rank 1 fails on purpose")
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    step(model, opt, _local(global_batch()), 0, 2)


def main(argv: list[str]) -> None:
    dist.init_process_group("gloo")
    try:
        if argv[0] == "update":
            _update(argv[1], Path(argv[2]))
        elif argv[0] == "checkpoint":
            _checkpoint(Path(argv[1]))
        elif argv[0] == "fail":
            _fail()
        else:
            raise ValueError(f"mode must be update, checkpoint or fail, got {argv[0]!r}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
