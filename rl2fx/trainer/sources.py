"""Where a :class:`~rl2fx.trainer.ppo.PPOTrainer` iteration's prompts and rewards come from (application layer).

Two sources with one interface: :class:`TaskSource`, the built-in digits task
(prompts and the reward generated in code), and :class:`DatasetSource`, the
user's prompt data set scored by the user's reward functions
(:mod:`rl2fx.prompts`, :mod:`rl2fx.rewards`). Each gives left-padded prompt
ids (:meth:`sample`) and, for a rollout of them, one reward per sequence plus
the per-function reward matrix for GDPO and the per-function metrics
(:meth:`score`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from rl2fx.prompts import PromptSampler, load_prompts, prepare_prompts, repeat_columns
from rl2fx.rewards import Scores, score

__all__ = ["Prompts", "Scored", "TaskSource", "DatasetSource"]


@dataclass
class Prompts:
    """One iteration's prompts: left-padded ``input_ids`` / ``attention_mask`` ``[n, prompt]``, the raw
    prompt values and the other data-set columns (user data), or the task's answers."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    raw: list[Any] = field(default_factory=list)
    columns: dict[str, list[Any]] = field(default_factory=dict)
    answers: torch.Tensor | None = None
    texts: list[str] = field(default_factory=list)  # the prompts as the model sees them (chat template applied)


@dataclass
class Scored:
    """Rewards of one rollout: ``scores [B]`` (combined), ``components [B, k]`` (one column per reward
    function, for GDPO), per-function metrics, and the decoded completions (user data only)."""

    scores: torch.Tensor
    components: torch.Tensor
    metrics: dict[str, float]
    completions: list[str] = field(default_factory=list)
    per_function: Scores | None = None
    token_rewards: torch.Tensor | None = None  # [B, response]: per-token credit summing to scores, if the source has it


class TaskSource:
    """The built-in digits task: prompts ``<bos> d1 .. dn :`` drawn from the trainer's prompt generator,
    reward = fraction of answer digits in place (:class:`~rl2fx.trainer.tasks.DigitCopyTask`); with
    ``token_level`` (``task.reward_level: token``) also as per-token credit, each right digit's share on its token."""

    reward_names: tuple[str, ...] = ("task",)

    def __init__(self, task: Any, tokenizer: Any, prompts_per_rollout: int, *, token_level: bool = False) -> None:
        self.task, self.tokenizer, self.n, self.token_level = task, tokenizer, prompts_per_rollout, token_level

    def sample(self, generator: torch.Generator) -> Prompts:
        p = self.task.sample_prompts(self.n, generator)
        return Prompts(input_ids=p.input_ids, attention_mask=torch.ones_like(p.input_ids), answers=p.answers)

    def score(self, prompts: Prompts, batch: Mapping[str, torch.Tensor], group_size: int) -> Scored:
        assert prompts.answers is not None
        answers = prompts.answers.repeat_interleave(group_size, 0).to(batch["response_ids"].device)
        s = self.task.reward(batch["response_ids"], answers)
        tok = self.task.token_rewards(batch["response_ids"], answers) if self.token_level else None
        return Scored(scores=s, components=s.unsqueeze(-1), metrics={}, token_rewards=tok)

    def state_dict(self) -> dict[str, Any]:
        return {}  # the prompts come from the trainer's generator, whose state is checkpointed with the RNGs

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass

    def chance_reward(self) -> float:
        return float(self.task.chance_reward(len(self.tokenizer)))


class DatasetSource:
    """The user's prompts (a ``datasets.Dataset``, a list of dicts or a ``.jsonl``/``.parquet`` path with
    a ``prompt_column``) scored by the user's reward functions.

    Prompts are plain text or chat messages (rendered with the tokenizer's chat
    template, ``add_generation_prompt=True``); every other column is passed to
    the reward functions, repeated for each of a prompt's ``G`` responses.
    Several functions are combined with ``weights`` by ``combine``
    (:meth:`rl2fx.rewards.Scores.combined`); a ``None`` reward is skipped and
    counted (``rewards/<name>/skipped``).
    """

    def __init__(self, dataset: Any, tokenizer: Any, reward_funcs: Sequence[Any] | None, *, prompts_per_rollout: int,
                 generator: torch.Generator, weights: Sequence[float] | None = None, combine: str = "weighted_sum",
                 prompt_column: str = "prompt", max_prompt_length: int | None = None, shuffle: bool = True,
                 name: str = "train_dataset", evaluation: bool = False) -> None:
        self.dataset = load_prompts(dataset, prompt_column=prompt_column, name=name)
        self.tokenizer = tokenizer
        self.reward_funcs = list(reward_funcs or [])  # none with an environment: it gives the rewards
        self.weights = None if weights is None else [float(w) for w in weights]
        self.combine = combine
        self.prompt_column = prompt_column
        self.name = name
        self.max_prompt_length = max_prompt_length
        self.n = prompts_per_rollout
        # evaluation reads the whole set in order (batches()); training draws shuffled batches
        self.sampler = None if evaluation else PromptSampler(
            self.dataset, batch_size=prompts_per_rollout, generator=generator, prompt_column=prompt_column,
            shuffle=shuffle)
        self.reward_names: tuple[str, ...] = ()

    def encode(self, raw: Sequence[Any], columns: Mapping[str, list[Any]]) -> Prompts:
        texts, ids, mask = prepare_prompts(list(raw), self.tokenizer, max_prompt_length=self.max_prompt_length)
        return Prompts(input_ids=ids, attention_mask=mask, raw=list(raw), texts=texts,
                       columns={k: list(v) for k, v in columns.items()})

    def sample(self, generator: torch.Generator | None = None) -> Prompts:
        if self.sampler is None:
            raise ValueError(f"{self.name} is evaluation data: read it with batches()")
        b = self.sampler.next_batch()
        return self.encode(b.prompts, b.columns)

    def batches(self) -> Any:
        """The whole data set in order, ``prompts_per_rollout`` prompts at a time (evaluation)."""
        cols = [c for c in self.dataset.column_names if c != self.prompt_column]
        for s in range(0, len(self.dataset), self.n):
            rows = self.dataset[s:s + self.n]
            yield self.encode(rows[self.prompt_column], {c: rows[c] for c in cols})

    def score(self, prompts: Prompts, batch: Mapping[str, torch.Tensor], group_size: int) -> Scored:
        mask = batch["response_mask"]
        # rollout pads every response after its eos with pad_token_id, which skip_special_tokens drops
        completions = self.tokenizer.batch_decode(batch["response_ids"], skip_special_tokens=True)
        raw = repeat_columns({"p": prompts.raw}, group_size)["p"]
        columns = repeat_columns(prompts.columns, group_size)
        s = score(self.reward_funcs, raw, completions, columns, weights=self.weights)
        self.reward_names = s.names
        device = mask.device
        combined = s.combined(method=self.combine).to(device)  # with the weights score() was given
        # a None becomes its group's mean: GDPO's per-group normalisation then gives it exactly 0
        comps = s.reward_components(group_size).to(device)
        return Scored(scores=combined, components=comps, metrics=s.metrics(), completions=completions, per_function=s)

    def state_dict(self) -> dict[str, Any]:
        return {} if self.sampler is None else self.sampler.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.sampler is not None:
            self.sampler.load_state_dict(state)

    def chance_reward(self) -> float:
        return float("nan")  # not known for a user's reward
