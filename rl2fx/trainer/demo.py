"""A short tour of every registered advantage estimator on a toy batch: ``python -m rl2fx.trainer.demo``.

Builds a small LLM-like batch (prompts x responses, 0/1 outcome reward on each
response's last token, a critic's values, a prompt/padding mask, slightly stale
behaviour log-probs), runs every estimator of the registry
(:func:`rl2fx.returns.list_estimators`, users' included) through
:func:`rl2fx.returns.advantages` with its registry defaults (``gamma = 1``) and
prints one row per estimator: mean and std of the advantages over masked-in
tokens and the wall time of the call. (``make demo`` is the training run,
``python -m rl2fx.train --config-name demo``.)
"""

from __future__ import annotations

import argparse
import time

import torch

from rl2fx.returns import advantages, get_estimator, list_estimators, masked_mean, masked_std


def toy_batch(prompts: int = 16, group_size: int = 4, time_steps: int = 256, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch shaped like RL2's: ``[prompts * group_size, time]`` with a right-padded response mask."""
    g = torch.Generator().manual_seed(seed)
    B = prompts * group_size
    prompt_len = torch.randint(4, time_steps // 4, (B,), generator=g)
    resp_len = torch.randint(1, time_steps // 2, (B,), generator=g)
    t = torch.arange(time_steps)
    mask = (t >= prompt_len[:, None]) & (t < (prompt_len + resp_len)[:, None])
    last = prompt_len + resp_len - 1
    p_correct = torch.rand(prompts, generator=g).repeat_interleave(group_size)
    score = (torch.rand(B, generator=g) < p_correct).float()
    rewards = torch.zeros(B, time_steps)
    rewards[torch.arange(B), last] = score
    values = (0.5 + 0.1 * torch.randn(B, time_steps, generator=g)) * mask
    logps = -torch.rand(B, time_steps, generator=g) * mask
    old_logps = logps + 0.05 * torch.randn(B, time_steps, generator=g) * mask
    return {"rewards": rewards, "values": values, "mask": mask, "logps": logps, "old_logps": old_logps}


def tour(batch: dict[str, torch.Tensor], group_size: int) -> list[dict[str, float | str]]:
    """One row per registered estimator: advantage mean/std over masked-in tokens and the call's time."""
    n_prompts = batch["rewards"].shape[0] // group_size
    inputs = {"rewards": batch["rewards"], "values": batch["values"], "mask": batch["mask"],
              "log_rhos": batch["logps"] - batch["old_logps"], "group_size": group_size,
              "greedy_rewards": torch.full((n_prompts,), 0.5)}
    rows = []
    for method in list_estimators():
        params = {"gamma": 1.0} if "gamma" in get_estimator(method).hyperparameters else {}
        advantages(method, **inputs, **params)  # warm-up
        t0 = time.perf_counter()
        out = advantages(method, **inputs, **params)
        dt = time.perf_counter() - t0
        adv = out["advantages"]
        if adv.ndim == 1:
            adv = adv.unsqueeze(-1).expand_as(batch["rewards"])
        rows.append({
            "estimator": method,
            "adv_mean": float(masked_mean(adv, batch["mask"])),
            "adv_std": float(masked_std(adv, batch["mask"])),
            "ms": dt * 1e3,
        })
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--time", type=int, default=256)
    args = ap.parse_args(argv)
    batch = toy_batch(args.prompts, args.group_size, args.time)
    B, T = batch["rewards"].shape
    print(f"rl2fx estimator tour: {B} responses ({args.prompts} prompts x {args.group_size}), "
          f"{T} steps, {int(batch['mask'].sum())} masked-in tokens")
    rows = tour(batch, args.group_size)
    print(f"{'estimator':<22}{'adv mean':>11}{'adv std':>10}{'time ms':>10}")
    print("-" * 45)
    for r in rows:
        print(f"{r['estimator']:<22}{r['adv_mean']:>11.4f}{r['adv_std']:>10.4f}{r['ms']:>10.2f}")


if __name__ == "__main__":
    main()
