"""Check that a data-parallel PPO update equals the single-process update on the same global batch.

Run under ``torchrun`` (gloo on CPU)::

    python -m torch.distributed.run --nproc_per_node 2 -m rl2fx.testing.ddp_equivalence OUT.pt

Every rank builds the same global batch (same seeds), keeps its contiguous
share of the rows, whitens its advantages with the *global* mean and variance
(:func:`rl2fx.returns.whiten` with the process group), and runs
:func:`rl2fx.step.train_step` on a DDP-wrapped copy of the model with
micro-batches. Rank 0 saves the resulting parameters. :func:`single_process_update`
does the same on one process with the whole batch; the two must agree to
floating-point rounding.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.distributed as dist

from rl2fx.returns import whiten
from rl2fx.rollout import rollout
from rl2fx.step import compute_logprobs, make_ppo_loss, train_step
from rl2fx.trainer.tasks import DigitCopyTask, build_tiny_lm

__all__ = ["global_batch", "single_process_update", "distributed_update", "STEPS"]

STEPS = 2


def global_batch(seed: int = 0) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The model and a 16-sequence batch with old/ref log-probs and raw (unwhitened) advantages."""
    torch.manual_seed(seed)
    model = build_tiny_lm(16, hidden_size=32, num_layers=2, num_heads=2, seed=seed)
    ref = build_tiny_lm(16, hidden_size=32, num_layers=2, num_heads=2, seed=seed + 1)
    task = DigitCopyTask(n_digits=2, mode="reverse")
    prompts = task.sample_prompts(4, torch.Generator().manual_seed(seed))
    b = rollout(model, prompts.input_ids, responses_per_prompt=4, max_new_tokens=3, eos_token_id=2, pad_token_id=0)
    with torch.no_grad():
        b["old_logprobs"], _ = compute_logprobs(model, b)
        b["ref_logprobs"], _ = compute_logprobs(ref, b)
    g = torch.Generator().manual_seed(seed + 2)
    b["advantages"] = (torch.randn(b["response_mask"].shape, generator=g) + 0.5) * b["response_mask"]
    return model, b


def _loss_fn() -> Any:
    return make_ppo_loss(clip=0.2, kl_coef=0.1, entropy_coef=0.01, agg_mode="token-mean")


def single_process_update(seed: int = 0) -> list[torch.Tensor]:
    """Whiten and update on the whole batch in one process; returns the parameters after ``STEPS`` steps."""
    model, b = global_batch(seed)
    b["advantages"] = whiten(b["advantages"], b["response_mask"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(STEPS):
        train_step(model, opt, b, loss_fn=_loss_fn(), max_grad_norm=1.0, step=step)
    return [p.detach().clone() for p in model.parameters()]


def distributed_update(seed: int = 0, micro_batch_size: int = 3) -> list[torch.Tensor]:
    """This rank's share of the batch, global whitening, DDP + micro-batches; returns the parameters."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    rank, world = dist.get_rank(), dist.get_world_size()
    model, b = global_batch(seed)
    n = b["input_ids"].shape[0]
    if n % world:
        raise ValueError(f"global batch {n} must divide by world size {world}")
    share = n // world
    local = {k: v[rank * share:(rank + 1) * share] for k, v in b.items()}
    local["advantages"] = whiten(local["advantages"], local["response_mask"], group=dist.group.WORLD)
    ddp = DDP(model)
    opt = torch.optim.Adam(ddp.parameters(), lr=1e-2)
    for step in range(STEPS):
        train_step(ddp, opt, local, loss_fn=_loss_fn(), max_grad_norm=1.0, micro_batch_size=micro_batch_size,
                   step=step)
    return [p.detach().clone() for p in model.parameters()]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    dist.init_process_group("gloo")
    try:
        params = distributed_update()
        if dist.get_rank() == 0:
            torch.save(params, argv[0])
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
