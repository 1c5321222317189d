r"""From a rollout and its scores to a training batch: old and reference log-probs, KL, advantages.

The third of the four composable pieces of a PPO/GRPO iteration::

    batch = rollout(policy, prompt_ids, prompt_mask=..., responses_per_prompt=G, ...)   # rl2fx.rollout
    scores = score(reward_funcs, prompts, completions, columns)                          # rl2fx.rewards
    batch = make_experience(policy, batch, scores.combined(), group_size=G, estimator="grpo")
    metrics = train_step(policy, optimizer, batch, loss_fn=make_ppo_loss())              # rl2fx.step

:func:`make_experience` runs only the forward passes the settings need
(:func:`experience_needs`): with one update epoch on on-policy data the
loss uses the detached current log-probs as the old ones (the ratio is 1 at
the first and only step, TRL's GRPOTrainer does the same), and without a KL
term the reference model is not run at all. For a PEFT model the reference
is the same model with its adapters disabled (``model.disable_adapter()``), so
no second copy of the weights is held.

Every forward pass on the left-padded batch gets ``position_ids`` derived
from the attention mask (:func:`rl2fx.logprobs.position_ids_from_mask`), as
``generate`` numbered the tokens when it sampled them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from rl2fx._typing import Float, Tensor, check_choice, typechecked
from rl2fx.logprobs import eval_mode
from rl2fx.losses import KL_ESTIMATORS, kl_estimate, kl_penalized_rewards
from rl2fx.multiturn import from_trajectories, to_trajectories
from rl2fx.returns import advantages, get_estimator, whiten
from rl2fx.rollout import scatter_last
from rl2fx.rollout_correction import masked_is, mismatch_metrics, truncated_is_weights
from rl2fx.step import compute_logprobs

__all__ = ["ExperienceNeeds", "experience_needs", "reference_logprobs", "make_experience", "estimate_advantages",
           "critic_values"]


@dataclass(frozen=True)
class ExperienceNeeds:
    """Which forward passes an iteration needs: ``old`` (the sampling policy's log-probs), ``ref``
    (the reference model's) and ``values`` (a critic's)."""

    old: bool
    ref: bool
    values: bool


def experience_needs(
    *,
    estimator: str,
    update_epochs: int = 1,
    kl_in_loss: bool = False,
    kl_in_reward: bool = False,
    log_kl: bool = False,
    with_entropy: bool = False,
    off_policy: bool = False,
) -> ExperienceNeeds:
    """The forward passes a configuration needs, and no others.

    - ``ref``: a KL term in the loss or the reward, or KL logging (``log_kl``).
    - ``old``: the sampling policy's log-probs are a separate pass only when the
      update runs more than one epoch over the batch (after the first optimiser
      step the current policy is no longer the sampler), when the data is
      off-policy, when KL is measured against the reference (the rollout KL is
      that of the sampler), when the sampler's entropy is wanted
      (``with_entropy``) or when the estimator reads ``old_logprobs``. Otherwise
      the loss uses the detached log-probs of its own forward pass, which equal
      them: the importance ratio is exactly 1 at the only step.
    - ``values``: the estimator trains a critic.

    >>> experience_needs(estimator="grpo")
    ExperienceNeeds(old=False, ref=False, values=False)
    >>> experience_needs(estimator="grpo", update_epochs=2, kl_in_loss=True)
    ExperienceNeeds(old=True, ref=True, values=False)
    """
    spec = get_estimator(estimator)
    ref = bool(kl_in_loss or kl_in_reward or log_kl)
    old = bool(update_epochs > 1 or off_policy or ref or with_entropy or "old_logprobs" in spec.inputs)
    return ExperienceNeeds(old=old, ref=ref, values=spec.needs_values)


def reference_logprobs(
    policy: torch.nn.Module,
    batch: Mapping[str, Tensor],
    ref_model: torch.nn.Module | None = None,
    *,
    temperature: float = 1.0,
    chunk_size: int = 256,
) -> Float[Tensor, "batch time"]:
    """Log-probs of ``batch["response_ids"]`` under the reference policy.

    ``ref_model``: a frozen model; ``None`` means the adapter-free base of a
    PEFT ``policy`` (its ``disable_adapter()`` context), the usual reference of
    LoRA training (TRL, OpenRLHF) that costs no second copy of the weights.
    A ``policy`` without adapters and no ``ref_model`` is an error.

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from peft import LoraConfig, get_peft_model
    >>> _ = torch.manual_seed(0)
    >>> base = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32,
    ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    >>> b = {"input_ids": torch.tensor([[1, 5, 7, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.long),
    ...      "response_ids": torch.tensor([[7, 3]])}
    >>> before = compute_logprobs(base, b)[0]
    >>> peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    >>> torch.allclose(reference_logprobs(peft_model, b), before)
    True
    """
    if ref_model is not None:
        model, ctx = ref_model, contextlib.nullcontext()
    elif hasattr(policy, "disable_adapter"):
        model, ctx = policy, policy.disable_adapter()
    else:
        raise ValueError("ref_model is None and the policy has no adapters to disable (not a PEFT model): "
                         "pass a frozen reference model, e.g. copy.deepcopy(policy).eval().requires_grad_(False)")
    inner: Any = getattr(model, "module", model)  # DDP
    with eval_mode(inner), torch.no_grad(), ctx:
        lp, _ = compute_logprobs(inner, dict(batch), temperature=temperature, chunk_size=chunk_size)
    return lp


@torch.no_grad()
@typechecked
def make_experience(
    policy: torch.nn.Module,
    batch: Mapping[str, Tensor],
    scores: Float[Tensor, " batch"],
    *,
    group_size: int,
    estimator: str = "grpo",
    estimator_params: Mapping[str, Any] | None = None,
    ref_model: torch.nn.Module | None = None,
    critic: torch.nn.Module | None = None,
    needs: ExperienceNeeds | None = None,
    kl_coef: float | Any = 0.0,
    kl_in_reward: bool = False,
    kl_estimator: str = "k3",
    kl_log_ratio_clamp: float | None = None,
    kl_value_clamp: float | None = None,
    reward_components: Float[Tensor, "batch k"] | None = None,
    whiten_advantages: bool = True,
    temperature: float = 1.0,
    chunk_size: int = 256,
    with_entropy: bool = False,
    group: Any = None,
    extra_inputs: Mapping[str, Any] | None = None,
    rollout_is: str | None = None,
    rollout_is_cap: float = 2.0,
    rollout_rs: str | None = None,
    rollout_rs_low: float = 0.5,
    rollout_rs_high: float = 2.0,
    stats: dict[str, float] | None = None,
    token_rewards: Float[Tensor, "rows time"] | None = None,
    trajectories: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    r"""Score-to-batch: add old/ref log-probs, the token KL, values, advantages and returns to a rollout.

    ``batch``: a :func:`~rl2fx.rollout.rollout` result (``input_ids``,
    ``attention_mask``, ``response_ids``, ``response_mask``), ``G = group_size``
    responses per prompt in contiguous rows. ``scores``: one outcome reward per
    sequence, placed on its last response token (:func:`~rl2fx.rollout.scatter_last`), unless
    ``token_rewards`` gives the rewards per token (a multi-turn rollout's per-turn rewards,
    :func:`rl2fx.multiturn.multi_turn_rollout`). ``trajectories`` (that rollout's
    ``sample_index``, ``segment_index`` and ``turns``): when a trajectory spans several
    rows (segments), ``scores`` has one entry per trajectory and the estimator runs on
    each trajectory's rows laid end to end (:func:`rl2fx.multiturn.to_trajectories`),
    the advantages mapped back to the rows; the forward passes stay per row.
    With ``kl_in_reward`` the per-token penalty :math:`-\beta\,\widehat{KL}_t`
    is folded into the rewards (Ziegler et al. 2019; ``kl_coef`` a float or a
    KL controller state). The advantages are those of the registered estimator
    ``estimator`` (:func:`rl2fx.returns.advantages`); estimators that read values
    get the ``critic``'s and are whitened over the batch (``whiten_advantages``;
    over ``group``'s ranks under ``torch.distributed``).

    ``needs`` (default: :func:`experience_needs` of the estimator, with a reference
    pass when ``ref_model`` is given or ``kl_in_reward``) selects the forward passes;
    the result holds ``old_logprobs`` only when that pass ran (the PPO loss then
    uses its own detached log-probs), ``ref_logprobs`` and ``kl`` (the token KL of
    the sampler from the reference, ``kl_estimator``, 0 on masked-out tokens) only
    with a reference pass (``kl_log_ratio_clamp`` / ``kl_value_clamp``: verl's ``low_var_kl`` clamps).
    ``ref_model=None`` with a reference pass uses a PEFT
    policy's adapter-disabled base (:func:`reference_logprobs`).

    **Rollout correction** (Yao et al. 2025; verl's ``rollout_is`` / ``rollout_rs``): when the
    batch holds the sampler's ``behavior_logprobs`` (a rollout engine's, or
    ``rollout(..., return_logprobs=True)``) and the old-log-prob pass runs, the
    mismatch between them is measured (into ``stats``, if given, as ``rollout_mismatch/<name>``
    for each of :func:`~rl2fx.rollout_correction.mismatch_metrics`, and
    ``rollout_rs/masked_tokens``); ``rollout_rs``
    (``token``/``sequence``/``geometric``) masks out the tokens or sequences whose ratio
    :math:`\pi_{old}/\mu` leaves ``[rollout_rs_low, rollout_rs_high]`` (they then count
    nowhere: not in the advantages, not in the loss); ``rollout_is`` (``token``/``sequence``)
    multiplies the advantages by the truncated weights :math:`\min(\pi_{old}/\mu, C)`,
    ``C = rollout_is_cap``, which weights every term of a surrogate linear in the
    advantage (the PPO clip objective included, the weight being >= 0).

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from rl2fx.rollout import rollout
    >>> _ = torch.manual_seed(0)
    >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32,
    ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, pad_token_id=0))
    >>> b = rollout(m, torch.tensor([[1, 5, 7]]), responses_per_prompt=4, max_new_tokens=3, eos_token_id=2,
    ...             pad_token_id=0)
    >>> exp = make_experience(m, b, torch.tensor([1.0, 0.0, 0.0, 1.0]), group_size=4)
    >>> sorted(k for k in exp if k not in b), exp["advantages"].shape == b["response_mask"].shape
    (['advantages', 'returns', 'scores', 'token_rewards'], True)
    """
    check_choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
    spec = get_estimator(estimator)
    mask = batch["response_mask"]
    segmented = trajectories is not None and int(trajectories["turns"].shape[0]) != mask.shape[0]
    n_seq = int(trajectories["turns"].shape[0]) if segmented else mask.shape[0]
    if scores.shape[0] != n_seq:
        raise ValueError(f"scores has {scores.shape[0]} entries but the batch has {n_seq} sequences")
    if segmented and token_rewards is None:
        raise ValueError("a segmented batch (trajectories spanning several rows) needs token_rewards")
    if needs is None:
        needs = experience_needs(estimator=estimator, kl_in_reward=kl_in_reward, with_entropy=with_entropy,
                                 log_kl=ref_model is not None)
    if kl_in_reward and not (needs.ref and needs.old):
        raise ValueError("kl_in_reward needs the old and reference log-probs (needs.old and needs.ref)")
    if needs.values and critic is None:
        raise ValueError(f"estimator {estimator!r} reads values: pass a critic")
    out: dict[str, Tensor] = dict(batch)
    out["scores"] = scores
    inner: Any = getattr(policy, "module", policy)
    old_lp = ent = None
    if needs.old:
        with eval_mode(inner):
            old_lp, ent = compute_logprobs(inner, out, temperature=temperature, chunk_size=chunk_size,
                                           with_entropy=with_entropy)
        out["old_logprobs"] = old_lp
        if ent is not None:
            out["entropy"] = ent
    behavior = out.get("behavior_logprobs")
    if (rollout_is is not None or rollout_rs is not None) and (behavior is None or old_lp is None):
        raise ValueError("rollout_is / rollout_rs need the sampler's behavior_logprobs in the batch and the "
                         "old-log-prob pass (needs.old): rollout(..., return_logprobs=True) and "
                         "experience_needs(..., off_policy=True)")
    weights = None
    if behavior is not None and old_lp is not None:
        if stats is not None:
            stats.update({f"rollout_mismatch/{k}": float(v)
                          for k, v in mismatch_metrics(old_lp, behavior, mask, cap=rollout_is_cap).items()})
        if rollout_rs is not None:
            keep = masked_is(old_lp, behavior, mask, level=rollout_rs, low=rollout_rs_low, high=rollout_rs_high)
            if stats is not None:
                stats["rollout_rs/masked_tokens"] = float((mask != 0).sum() - keep.sum())
            mask = keep.to(mask.dtype)
            out["response_mask"] = mask
        if rollout_is is not None:
            weights = truncated_is_weights(old_lp, behavior, mask, level=rollout_is, cap=rollout_is_cap)
    rewards = scatter_last(scores, mask) if token_rewards is None else torch.where(mask != 0, token_rewards, 0.0)
    if needs.ref:
        ref_lp = reference_logprobs(policy, out, ref_model, temperature=temperature, chunk_size=chunk_size)
        out["ref_logprobs"] = ref_lp
        if old_lp is not None:
            keep = mask != 0  # select before arithmetic: a masked-out position never changes a result
            clamps = {"log_ratio_clamp": kl_log_ratio_clamp, "value_clamp": kl_value_clamp}
            out["kl"] = torch.where(keep, kl_estimate(torch.where(keep, old_lp, 0.0), torch.where(keep, ref_lp, 0.0),
                                                      kl_estimator, **clamps), 0.0)
            if kl_in_reward:
                rewards = kl_penalized_rewards(rewards, old_lp, ref_lp, kl_coef, estimator=kl_estimator, mask=mask,
                                               **clamps)
    out["token_rewards"] = rewards
    if reward_components is not None:
        out["reward_components"] = reward_components
    if weights is not None:
        out["is_weights"] = weights
    values = None
    if critic is not None and needs.values:
        values = critic_values(critic, out)
        out["old_values"] = values
    adv, ret = estimate_advantages(out, estimator=spec.name, estimator_params=estimator_params,
                                   group_size=group_size, values=values, whiten_advantages=whiten_advantages,
                                   group=group, trajectories=trajectories, extra_inputs=extra_inputs)
    out["advantages"], out["returns"] = adv, ret
    return out


@torch.no_grad()
def critic_values(critic: torch.nn.Module, batch: Mapping[str, Tensor]) -> Float[Tensor, "batch time"]:
    """The critic's value of each response position (the state before that token), 0 where masked out.

    ``critic(input_ids, attention_mask)`` returns one value per input position; the value of
    response token ``t`` is read at the position before it.
    """
    mask = batch["response_mask"]
    c: Any = getattr(critic, "module", critic)
    values = c(batch["input_ids"], batch["attention_mask"])[:, -mask.shape[1] - 1:-1]
    return torch.where(mask != 0, values, 0.0)


def estimate_advantages(
    exp: Mapping[str, Tensor],
    *,
    estimator: str,
    group_size: int,
    estimator_params: Mapping[str, Any] | None = None,
    log_rhos: Float[Tensor, "batch time"] | None = None,
    values: Float[Tensor, "batch time"] | None = None,
    whiten_advantages: bool = True,
    group: Any = None,
    trajectories: Mapping[str, Tensor] | None = None,
    extra_inputs: Mapping[str, Any] | None = None,
) -> tuple[Float[Tensor, "batch time"], Float[Tensor, "batch time"]]:
    r"""Advantages and returns of a :func:`make_experience` batch, from its stored rewards.

    ``exp`` holds ``response_mask``, ``token_rewards`` (the rewards the estimator reads, the
    KL penalty already folded in when ``kl_in_reward``), ``scores``, and where they were made
    ``old_logprobs``, ``reward_components`` and ``is_weights`` (rollout correction);
    ``trajectories`` as in :func:`make_experience` (segmented multi-turn rows). ``log_rhos``:
    :math:`\log\pi_\theta(a_t|s_t) - \log\pi_{old}(a_t|s_t)`, the current policy's log-probs
    against the sampler's; ``None`` (0) at the first update of a rollout, where the two are one
    policy. Re-estimating before each later epoch with the current ratios and values
    (``PPOTrainer``'s ``trainer.recompute_advantages``) is what gives V-trace's truncated
    ratios (Espeholt et al. 2018), Retrace's traces (Munos et al. 2016) and clipped IS
    anything to correct. Value-based estimators' advantages are whitened
    (``whiten_advantages``, over ``group``'s ranks); the rollout-correction weights multiply them.

    Returns ``(advantages, returns)``, both ``[batch, time]`` and 0 on masked-out positions.

    >>> from rl2fx.rollout import scatter_last
    >>> m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    >>> exp = {"response_mask": m, "token_rewards": scatter_last(torch.tensor([1.0, 0.0]), m),
    ...        "scores": torch.tensor([1.0, 0.0])}
    >>> adv, ret = estimate_advantages(exp, estimator="rloo", group_size=2)
    >>> adv.tolist()
    [[1.0, 1.0, 0.0], [-1.0, -1.0, -1.0]]
    """
    spec = get_estimator(estimator)
    row_mask = exp["response_mask"]
    rewards = torch.where(row_mask != 0, exp["token_rewards"], 0.0)
    old_lp = exp.get("old_logprobs")
    dtype = old_lp.dtype if old_lp is not None else torch.float32
    # segments: the estimator sees each trajectory's rows end to end (masked equals packed), then back to rows
    segmented = trajectories is not None and int(trajectories["turns"].shape[0]) != row_mask.shape[0]

    def lay(x: Tensor) -> Tensor:
        return to_trajectories(x, trajectories) if segmented else x  # type: ignore[arg-type]

    mask = lay(row_mask)
    rhos = torch.zeros_like(rewards) if log_rhos is None else torch.where(row_mask != 0, log_rhos, 0.0)
    components = exp.get("reward_components")
    kw: dict[str, Any] = {"rewards": lay(rewards), "mask": mask, "log_rhos": lay(rhos.to(rewards.dtype)),
                          "group_size": group_size, "group": group,
                          "reward_components": components if components is not None else exp["scores"].unsqueeze(-1)}
    if old_lp is not None:
        kw["old_logprobs"] = lay(old_lp)
    if values is not None:
        kw["values"] = lay(values)
    kw.update(extra_inputs or {})
    res = advantages(spec.name, **kw, **dict(estimator_params or {}))
    adv = res["advantages"].to(dtype)
    if adv.ndim == 1:
        adv = adv.unsqueeze(-1) * mask
    ret = res["returns"].to(dtype)
    ret = (ret if ret.ndim == 2 else ret.unsqueeze(-1)) * mask
    if segmented:
        adv, ret = from_trajectories(adv, trajectories), from_trajectories(ret, trajectories)  # type: ignore[arg-type]
    if whiten_advantages and spec.needs_values:
        adv = whiten(adv, row_mask, group=group)
    weights = exp.get("is_weights")
    if weights is not None:
        adv = adv * weights.to(adv.dtype)
    keep = row_mask != 0
    return torch.where(keep, adv, 0.0), torch.where(keep, ret, 0.0)
