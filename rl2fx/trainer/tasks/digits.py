"""Verifiable-reward digit tasks small enough for a tiny random transformer to learn by RL.

:class:`DigitCopyTask`: the prompt is ``<bos> d_1 ... d_k :`` with random digits;
the answer is the same digits (or reversed, or each repeated); the reward is the
fraction of answer positions that are exactly right,

.. math::

    r(y) = \\frac{1}{k} \\sum_{i=1}^{k} \\mathbb{1}[y_i = d_{\\sigma(i)}] \\in [0, 1],

a dense, exactly verifiable signal in the spirit of the synthetic "copy" and
"reverse" tasks used to study sequence models (Graves et al., "Neural Turing
Machines", 2014) and of RL with verifiable rewards (DeepSeek-R1, 2025). A
uniformly random policy over the ``V`` tokens scores :math:`1/V` in
expectation (:meth:`DigitCopyTask.chance_reward`), which makes "the reward
rose" a clear, checkable statement.

Prompts all have the same length, so batches need no padding on the prompt
side; responses stop at ``<eos>`` and are right-padded with ``<pad>`` (the
``response_mask`` marks real tokens, ``<eos>`` included).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rl2fx._typing import Float, Int, Tensor, check_choice, check_range, typechecked
from rl2fx.trainer.tasks.tokenizer import VOCAB

__all__ = ["DigitCopyTask", "PromptBatch", "REWARD_LEVELS"]

#: Where the task's reward goes: ``sequence``, one outcome per response (on its last token);
#: ``token``, each right digit's share on its own token (:meth:`DigitCopyTask.token_rewards`).
REWARD_LEVELS = ("sequence", "token")

_DIGIT0 = VOCAB["0"]


@dataclass(frozen=True)
class PromptBatch:
    """Prompt token ids ``[n, prompt_len]`` and the per-prompt answer ``[n, answer_len]`` (token ids)."""

    input_ids: Int[Tensor, "n prompt"]
    answers: Int[Tensor, "n answer"]


@dataclass(frozen=True)
class DigitCopyTask:
    """Copy (``mode="copy"``), reverse (``"reverse"``) or repeat (``"repeat"``) ``n_digits`` digits.

    ``"repeat"`` asks for the single prompt digit ``n_digits`` times (the easiest
    variant: only one attention target). ``answer_len`` is the number of tokens the
    answer has; generate at least that many.

    >>> task = DigitCopyTask(n_digits=2, mode="reverse")
    >>> batch = task.sample_prompts(3, torch.Generator().manual_seed(0))
    >>> batch.input_ids.shape, batch.answers.shape
    (torch.Size([3, 4]), torch.Size([3, 2]))
    >>> perfect = torch.cat([batch.answers, torch.full((3, 1), VOCAB["<eos>"])], dim=1)
    >>> task.reward(perfect, batch.answers).tolist()
    [1.0, 1.0, 1.0]
    >>> round(task.chance_reward(), 4)
    0.0625
    """

    n_digits: int = 2
    mode: str = "copy"

    def __post_init__(self) -> None:
        check_range("n_digits", self.n_digits, 1, 16)
        check_choice("mode", self.mode, ("copy", "reverse", "repeat"))

    @property
    def answer_len(self) -> int:
        return self.n_digits

    @property
    def prompt_len(self) -> int:
        return (1 if self.mode == "repeat" else self.n_digits) + 2

    def sample_prompts(self, n: int, generator: torch.Generator | None = None) -> PromptBatch:
        """``n`` random prompts ``<bos> digits :`` and their answers, drawn from ``generator``."""
        check_range("n", n, 1, None)
        k = 1 if self.mode == "repeat" else self.n_digits
        digits = torch.randint(0, 10, (n, k), generator=generator) + _DIGIT0
        bos = torch.full((n, 1), VOCAB["<bos>"], dtype=torch.long)
        colon = torch.full((n, 1), VOCAB[":"], dtype=torch.long)
        if self.mode == "copy":
            answers = digits
        elif self.mode == "reverse":
            answers = digits.flip(-1)
        else:
            answers = digits.expand(n, self.n_digits).clone()
        return PromptBatch(input_ids=torch.cat([bos, digits, colon], dim=1), answers=answers)

    @typechecked
    def reward(self, responses: Int[Tensor, "n resp"], answers: Int[Tensor, "n answer"]) -> Float[Tensor, " n"]:
        """Fraction of the ``answer_len`` first response tokens equal to the answer.

        Missing positions (a response shorter than the answer, or cut by ``<eos>``)
        count as wrong; tokens after the answer are ignored.
        """
        k = answers.shape[-1]
        if responses.shape[-1] < k:
            pad = torch.full((responses.shape[0], k - responses.shape[-1]), VOCAB["<pad>"], dtype=responses.dtype)
            responses = torch.cat([responses, pad], dim=-1)
        return (responses[:, :k] == answers).float().mean(-1)

    @typechecked
    def token_rewards(self, responses: Int[Tensor, "n resp"], answers: Int[Tensor, "n answer"]
                      ) -> Float[Tensor, "n resp"]:
        """The reward as token-level partial credit: :math:`1/k` on each answer token that is right, 0 elsewhere.

        Row sums equal :meth:`reward`; the credit sits on the token that earned it, so an
        estimator that reads per-token rewards (a critic's TD errors, returns-to-go) can tell
        which digit was right, while one that reads only the outcome sees the sum.

        >>> task = DigitCopyTask(n_digits=2, mode="copy")
        >>> ans = torch.tensor([[VOCAB["3"], VOCAB["4"]]])
        >>> task.token_rewards(torch.tensor([[VOCAB["3"], VOCAB["9"], VOCAB["<eos>"]]]), ans).tolist()
        [[0.5, 0.0, 0.0]]
        """
        k = answers.shape[-1]
        t = responses.shape[-1]
        hit = responses[:, : min(k, t)] == answers[:, : min(k, t)]
        out = torch.zeros(responses.shape, dtype=torch.float32, device=responses.device)
        out[:, : hit.shape[-1]] = hit.float() / k
        return out

    def chance_reward(self, vocab_size: int = len(VOCAB)) -> float:
        """Expected reward of a policy uniform over ``vocab_size`` tokens: :math:`1/V`."""
        return 1.0 / vocab_size
