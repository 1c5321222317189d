"""Guess the number, with higher/lower feedback: a multi-turn task in RL2's ``env_step`` protocol.

Each prompt row has a secret ``target`` between ``low`` and ``high``. Every turn
the model answers with a number; the first integer in its response is the guess.

- right guess: reward 1.0, done;
- wrong guess: reward 0.0, the next state appends ``" higher"`` or ``" lower"`` and asks again;
- no number: reward 0.0, the next state appends ``" a number"`` and asks again.

The text uses only lower-case letters, digits, spaces, ``:`` and newlines, so
:func:`rl2fx.testing.tokenizers.char_tokenizer` covers it. The prompt set is
``data/guess.jsonl`` next to this file (:data:`DATA`). With ``max_turns`` turns
a policy that bisects wins every game with ``high - low + 1 <= 2**max_turns - 1``.

>>> from rl2fx.envs import EnvSample
>>> s = EnvSample(sample={"target": 7, "low": 1, "high": 9}, state_text="guess:", action_text=" 5", turn=1)
>>> env_step(s)
{'next_state': 'guess: 5 higher\\nguess:', 'done': False, 'reward': 0.0}
>>> env_step(EnvSample(sample={"target": 7}, state_text="guess:", action_text="7", turn=2))["reward"]
1.0
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

__all__ = ["DATA", "env_step"]

#: The shipped prompt set: JSONL rows ``{"prompt", "target", "low", "high"}``.
DATA = Path(__file__).parent / "data" / "guess.jsonl"

_INT = re.compile(r"\d+")


def env_step(sample: Any) -> dict[str, Any]:
    """One guess: reward 1 and done when right, else higher/lower feedback and another question."""
    target = int(sample.sample["target"])
    found = _INT.search(sample.action_text)
    text = sample.state_text + sample.action_text
    if found is None:
        return {"next_state": text + " a number\nguess:", "done": False, "reward": 0.0}
    guess = int(found.group())
    if guess == target:
        return {"next_state": None, "done": True, "reward": 1.0}
    hint = "higher" if guess < target else "lower"
    return {"next_state": f"{text} {hint}\nguess:", "done": False, "reward": 0.0}
