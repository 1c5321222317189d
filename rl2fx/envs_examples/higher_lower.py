r"""Higher or lower, 1 to 4, in three turns: a multi-turn task that a random tiny model learns in a minute.

The game is :mod:`rl2fx.envs_examples.guess_number` (its :func:`env_step`, RL2's
protocol) on a range small enough for a CPU: the secret ``target`` is 1, 2, 3 or
4, the model answers one token per turn, and a wrong guess gets ``higher`` or
``lower`` and another ``guess:``. Reward 1 when a guess is right (the game ends),
0 otherwise; the score of a game is 1 for a win within ``max_turns`` turns.

With :data:`MAX_TURNS` = 3 turns, bisection wins every game (guess 2; ``lower``
→ 1; ``higher`` → 3, then ``higher`` → 4). Policies that ignore the feedback win
less: three distinct guesses in a fixed order 3/4, uniform guesses among the four
digits :math:`1 - (3/4)^3 \approx 0.58`, the same digit every turn 1/4; a random
model, whose one token is the right digit about one time in :math:`|V| = 15`,
about 0.2 to 0.5. So the success rate can rise from there to 1, and above 3/4
only by reading the environment's feedback.

Everything is built locally: :func:`build_tokenizer`, a word-level tokenizer over
the game's words (:data:`VOCAB`), and :func:`build_model`, a tiny GPT-2 with
random weights. The prompt set is ``data/higher_lower.jsonl`` (:data:`DATA`,
written by :func:`make_rows`; regenerate with ``python -m rl2fx.envs_examples.higher_lower``).

>>> tok = build_tokenizer()
>>> rows = make_rows(2, seed=0)
>>> rows
[{'prompt': 'guess 1 to 4\nguess:', 'target': 1, 'low': 1, 'high': 4}, {'prompt': 'guess 1 to 4\nguess:', 'target': 2, 'low': 1, 'high': 4}]
>>> tok.convert_ids_to_tokens(tok(rows[0]["prompt"])["input_ids"])
['<bos>', 'guess', '1', 'to', '4', 'guess:']
>>> from rl2fx.envs import EnvSample
>>> env_step(EnvSample(sample=rows[0], state_text=rows[0]["prompt"], action_text="2", turn=1))
{'next_state': 'guess 1 to 4\nguess:2 lower\nguess:', 'done': False, 'reward': 0.0}
>>> tok.convert_ids_to_tokens(tok(" lower\nguess:", add_special_tokens=False)["input_ids"])
['lower', 'guess:']
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from rl2fx._typing import check_range
from rl2fx.envs_examples.guess_number import env_step

__all__ = ["DATA", "LOW", "HIGH", "MAX_TURNS", "SPECIAL_TOKENS", "WORDS", "VOCAB", "TRAINING",
           "env_step", "build_tokenizer", "build_model", "make_rows"]

#: the shipped prompt set: JSONL rows ``{"prompt", "target", "low", "high"}``
DATA = Path(__file__).parent / "data" / "higher_lower.jsonl"
LOW, HIGH = 1, 4
#: turns per game: enough for bisection to win every game of the range
MAX_TURNS = 3
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
#: every word the prompt and :func:`env_step` write (``a number`` follows a response with no digit)
WORDS = tuple(str(d) for d in range(LOW, HIGH + 1)) + ("guess", "to", "guess:", "higher", "lower", "a", "number")
#: token string -> id, in a fixed order so that ids never depend on the machine
VOCAB: dict[str, int] = {t: i for i, t in enumerate(SPECIAL_TOKENS + WORDS)}
PROMPT = f"guess {LOW} to {HIGH}\nguess:"
#: settings under which the notebook ``08_multi_turn.ipynb`` and ``tests/test_envs_examples.py``
#: see the success rate rise (GRPO, full fine-tuning, one update epoch, no KL term, one CPU thread)
TRAINING: dict[str, Any] = {
    "lr": 2e-3, "prompts_per_step": 8, "responses_per_prompt": 8, "max_new_tokens": 1, "max_turns": MAX_TURNS,
    "temperature": 1.0, "steps": 200, "update_epochs": 1, "clip": 0.2, "max_grad_norm": 1.0, "kl_coef": 0.0,
}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The game's tokenizer, built in memory: one id per word of :data:`VOCAB`, text split on whitespace.

    ``tokenizer(text)`` prepends ``<bos>``; a word outside the vocabulary becomes
    ``<unk>``; padding is on the left.

    >>> tok = build_tokenizer()
    >>> len(tok), tok.pad_token_id, tok.eos_token_id, tok("guess 3 higher")["input_ids"]
    (15, 0, 2, [1, 8, 6, 11])
    >>> tok.decode([6]), tok.decode([2], skip_special_tokens=True)
    ('3', '')
    """
    core = Tokenizer(models.WordLevel(vocab=dict(VOCAB), unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                        special_tokens=[("<bos>", VOCAB["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", padding_side="left", model_max_length=64)


def build_model(tokenizer: PreTrainedTokenizerFast, *, seed: int = 0, n_layer: int = 2, n_embd: int = 64,
                n_head: int = 4, n_positions: int = 32, initializer_range: float = 0.1) -> GPT2LMHeadModel:
    """A GPT-2 (Radford et al., 2019) with random weights drawn under ``seed``, sized for a CPU.

    As :func:`rl2fx.examples.counting.build_model`: dropout off, tied output head,
    ``initializer_range`` 0.1; building does not move the caller's global RNG. A
    game is at most 6 prompt tokens and 3 tokens per turn, within ``n_positions``.

    >>> m = build_model(build_tokenizer())
    >>> sum(p.numel() for p in m.parameters()), m.config.vocab_size
    (103104, 15)
    """
    for name, value in (("n_layer", n_layer), ("n_embd", n_embd), ("n_head", n_head), ("n_positions", n_positions)):
        check_range(name, value, 1, None)
    if n_embd % n_head:
        raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True, initializer_range=initializer_range,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(config)


def make_rows(n: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` games whose secret targets cycle through ``LOW..HIGH`` (balanced), shuffled by ``random.Random(seed)``.

    >>> sorted(r["target"] for r in make_rows(8, seed=1))
    [1, 1, 2, 2, 3, 3, 4, 4]
    """
    check_range("n", n, 1, None)
    targets = [LOW + i % (HIGH - LOW + 1) for i in range(n)]
    random.Random(seed).shuffle(targets)
    return [{"prompt": PROMPT, "target": t, "low": LOW, "high": HIGH} for t in targets]


if __name__ == "__main__":
    DATA.write_text("".join(json.dumps(r) + "\n" for r in make_rows(64, seed=0)), encoding="utf-8")
    print(f"wrote {DATA}")
