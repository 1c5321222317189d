"""Shipped examples for bringing your own model, tokenizer, prompts and reward functions.

Each example is a module with everything a user would otherwise supply, built
locally (nothing is downloaded): a tokenizer, a tiny randomly initialised
``transformers`` model built from a config, a JSONL prompt set shipped as package
data, and reward functions with TRL's signature
``f(prompts, completions, **dataset_columns) -> list[float | None]``.

* :mod:`rl2fx.examples.counting`: continue a counting sequence (``count 3 4 5 ->``
  answers ``6 7``), with a GPT-2 (absolute position embeddings, so left-padded
  prompts need ``position_ids``) and two rewards, ``correctness`` and ``format_reward``.
"""
