"""The counting example: a tokenizer, a tiny GPT-2, a shipped prompt set and two reward functions.

Everything a user brings to an RL run, in miniature and built locally:

* :func:`build_tokenizer`: a word-level :class:`transformers.PreTrainedTokenizerFast`
  (``tokenizers`` ``WordLevel`` model) over the ten digits, the word ``count``, ``<pad>`` /
  ``<bos>`` / ``<eos>`` / ``<unk>`` and chat role markers, with a Jinja
  ``chat_template`` so chat-message prompts render with
  ``apply_chat_template(messages, add_generation_prompt=True)``. Padding is on the left.
* :func:`build_model`: a randomly initialised :class:`transformers.GPT2LMHeadModel`
  from a :class:`transformers.GPT2Config`. GPT-2 has *absolute* position embeddings,
  so a left-padded prompt is scored right only with ``position_ids`` derived from
  the attention mask (:func:`rl2fx.logprobs.position_ids_from_mask`); the example
  exercises that on purpose.
* :data:`DATA_FILES` / :func:`load_rows`: the shipped JSONL prompt sets,
  ``counting`` (plain-text prompts) and ``counting_chat`` (chat messages), with a
  ``prompt`` and an ``answer`` column. :func:`make_rows` generated them
  (:func:`write_jsonl`; regenerate with ``python -m rl2fx.examples.counting``).
* :func:`correctness` and :func:`format_reward`: reward functions with TRL's
  signature ``f(prompts, completions, **dataset_columns) -> list[float | None]``.

The task: continue a counting sequence modulo 10 (the last digit of a counter).
The prompt shows ``length`` consecutive digits (``count 7 8 9 0``) and the
answer is the next :data:`N_ANSWER` (``1 2``). A prompt set mixes lengths, so a
batch of prompts is left-padded. A randomly initialised model answers right with
probability about ``1 / len(tokenizer)`` per digit; RL alone (no pre-training,
LoRA adapters only) teaches it the successor rule within a few hundred GRPO steps
on one CPU thread (``tests/test_examples.py`` measures it). The plain prompts end on
the last digit, so the first answer digit is its successor; behind the chat
template's ``<|end|> <|assistant|>`` the model must first learn to attend two tokens
back, which takes longer: use ``counting`` to show learning, ``counting_chat`` to
exercise chat rendering.

>>> tok = build_tokenizer()
>>> rows = load_rows("counting")
>>> rows[:2]
[{'prompt': 'count 6 7 8 9 0', 'answer': '1 2'}, {'prompt': 'count 4 5', 'answer': '6 7'}]
>>> batch = tok([r["prompt"] for r in rows[:2]], padding=True, return_tensors="pt")
>>> batch["attention_mask"].tolist()  # left padding: prompts of different lengths
[[1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1]]
>>> correctness([r["prompt"] for r in rows[:2]], ["1 2", "6 1"], answer=[r["answer"] for r in rows[:2]])
[1.0, 0.5]
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from rl2fx._typing import check_range

__all__ = [
    "SPECIAL_TOKENS", "ROLE_TOKENS", "DIGITS", "WORDS", "VOCAB", "CHAT_TEMPLATE", "N_ANSWER", "DATA_FILES",
    "build_tokenizer", "build_model", "make_rows", "write_jsonl", "data_path", "load_rows",
    "correctness", "format_reward", "REWARD_FUNCS", "REWARD_WEIGHTS", "LORA_TARGETS", "TRAINING", "lora_config",
]

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
#: chat role markers, in the vocabulary and matched whole (never split by the pre-tokenizer)
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
DIGITS = tuple(str(d) for d in range(10))
WORDS = ("count",)
#: token string -> id, in a fixed order so that ids never depend on the machine.
VOCAB: dict[str, int] = {t: i for i, t in enumerate(SPECIAL_TOKENS + ROLE_TOKENS + DIGITS + WORDS)}
#: ``<bos><|user|> {content} <|end|> ... <|assistant|>``; roles other than system/user/assistant raise.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('chat role must be system, user or assistant, got ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|> ' + message['content'] + ' <|end|> ' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
#: digits in every answer (the continuation of the sequence)
N_ANSWER = 2
#: shipped prompt sets: name -> file inside the package (``rl2fx/examples/<file>``)
DATA_FILES: dict[str, str] = {"counting": "data/counting.jsonl", "counting_chat": "data/counting_chat.jsonl"}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The example's tokenizer, built in memory: one id per word, digit or marker; left padding.

    Text is split on whitespace and every digit is its own token (``12`` is ``1 2``);
    a word outside :data:`VOCAB` becomes ``<unk>``. ``tokenizer(text)`` prepends
    ``<bos>``; the chat template writes its own ``<bos>``, so text rendered with
    ``apply_chat_template(..., tokenize=False)`` is tokenized with
    ``add_special_tokens=False``. The result saves and reloads with
    ``save_pretrained`` / ``AutoTokenizer.from_pretrained`` like any hub tokenizer.

    >>> tok = build_tokenizer()
    >>> tok("count 3 4")["input_ids"], len(tok), tok.pad_token_id, tok.eos_token_id
    ([1, 18, 11, 12], 19, 0, 2)
    >>> tok.convert_ids_to_tokens(tok("count 12 ten")["input_ids"])
    ['<bos>', 'count', '1', '2', '<unk>']
    >>> tok.decode([11, 12, 2]), tok.decode([11, 12, 2], skip_special_tokens=True)
    ('3 4 <eos>', '3 4')
    >>> tok.apply_chat_template([{"role": "user", "content": "count 3 4"}], add_generation_prompt=True,
    ...                         tokenize=False)
    '<bos><|user|> count 3 4 <|end|> <|assistant|>'
    """
    core = Tokenizer(models.WordLevel(vocab=dict(VOCAB), unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Digits(individual_digits=True)])
    # special: matched before pre-tokenization (so "<|user|>" stays whole) and dropped by skip_special_tokens
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS + ROLE_TOKENS])
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                        special_tokens=[("<bos>", VOCAB["<bos>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
        padding_side="left", chat_template=CHAT_TEMPLATE, model_max_length=64,
    )


def build_model(
    tokenizer: PreTrainedTokenizerFast,
    *,
    seed: int = 0,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_positions: int = 64,
    initializer_range: float = 0.1,
) -> GPT2LMHeadModel:
    r"""A GPT-2 (Radford et al., 2019) with random weights drawn under ``seed``, sized for a CPU.

    The vocabulary and the ``<pad>`` / ``<bos>`` / ``<eos>`` ids come from
    ``tokenizer``. Dropout is off, as usual for RL fine-tuning (the log-probs of the
    update must be the sampler's); the output head is tied to the token embeddings.
    Building does not move the caller's global RNG.

    ``initializer_range`` is the standard deviation of the random weights (GPT-2's
    own 0.02 by default in transformers; 0.1 here). The logits are
    :math:`\mathrm{LN}(h)^\top E`, with :math:`\|\mathrm{LN}(h)\| \approx \sqrt{d}` and
    the rows of the embedding :math:`E` of norm about :math:`\sigma\sqrt{d}`, so they
    span at most about :math:`2\sigma d` nats. LoRA freezes :math:`E`: at
    :math:`\sigma = 0.02` and :math:`d = 64` no adapter can make the policy put more
    than about 40% of its mass on one token, and RL stalls at chance; at 0.1
    the range is about 13 nats, as with a pre-trained model.

    >>> tok = build_tokenizer()
    >>> m = build_model(tok)
    >>> type(m).__name__, sum(p.numel() for p in m.parameters()), m.config.n_positions
    ('GPT2LMHeadModel', 105408, 64)
    >>> a, b = build_model(tok, seed=1), build_model(tok, seed=1)
    >>> all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    True
    """
    for name, value in (("n_layer", n_layer), ("n_embd", n_embd), ("n_head", n_head), ("n_positions", n_positions)):
        check_range(name, value, 1, None)
    check_range("initializer_range", initializer_range, 0.0, None, low_inclusive=False)
    if n_embd % n_head:
        raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if getattr(tokenizer, name) is None:
            raise ValueError(f"tokenizer.{name} is None; the model needs <pad>, <bos> and <eos> ids")
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True, initializer_range=initializer_range,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    return model


def make_rows(
    n: int,
    *,
    seed: int = 0,
    min_length: int = 2,
    max_length: int = 6,
    chat: bool = False,
) -> list[dict[str, Any]]:
    """``n`` counting prompts with their answers, drawn from ``random.Random(seed)``.

    Each row shows ``length`` (uniform in ``[min_length, max_length]``) consecutive
    digits from a uniform start, counting up modulo 10; ``answer`` holds the next
    :data:`N_ANSWER` digits. ``prompt`` is ``"count d1 ... dk"``, or with
    ``chat=True`` one user message ``[{"role": "user", "content": "count d1 ... dk"}]``.

    >>> make_rows(2, seed=0)
    [{'prompt': 'count 6 7 8 9 0', 'answer': '1 2'}, {'prompt': 'count 4 5', 'answer': '6 7'}]
    >>> make_rows(1, seed=0, chat=True)
    [{'prompt': [{'role': 'user', 'content': 'count 6 7 8 9 0'}], 'answer': '1 2'}]
    """
    check_range("n", n, 1, None)
    check_range("min_length", min_length, 1, None)
    check_range("max_length", max_length, min_length, None)
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    for _ in range(n):
        length, start = rng.randint(min_length, max_length), rng.randrange(10)
        seq = [str((start + i) % 10) for i in range(length + N_ANSWER)]
        shown, answer = " ".join(seq[:length]), " ".join(seq[length:])
        prompt: Any = [{"role": "user", "content": f"count {shown}"}] if chat else f"count {shown}"
        rows.append({"prompt": prompt, "answer": answer})
    return rows


def write_jsonl(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write ``rows`` as JSON lines (one object per line, keys in order) to ``path``; returns it."""
    out = Path(path)
    out.write_text("".join(json.dumps(dict(r)) + "\n" for r in rows), encoding="utf-8")
    return out


def data_path(name: str = "counting") -> Path:
    """The installed path of the shipped prompt set ``name`` (a key of :data:`DATA_FILES`).

    >>> data_path("counting").name
    'counting.jsonl'
    >>> data_path("count")
    Traceback (most recent call last):
    ...
    ValueError: name must be one of ['counting', 'counting_chat'], got 'count'
    """
    if name not in DATA_FILES:
        raise ValueError(f"name must be one of {sorted(DATA_FILES)}, got {name!r}")
    return Path(str(resources.files("rl2fx.examples").joinpath(DATA_FILES[name])))


def load_rows(name: str = "counting") -> list[dict[str, Any]]:
    """The rows of the shipped prompt set ``name`` (a list of dicts: ``prompt``, ``answer``).

    The same file loads as a ``datasets.Dataset`` with
    ``datasets.load_dataset("json", data_files=str(data_path(name)), split="train")``.

    >>> rows = load_rows("counting_chat")
    >>> len(rows), rows[0]["prompt"][0]["role"]
    (400, 'user')
    """
    with data_path(name).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


_DIGIT_WORDS = frozenset(DIGITS)


def _text(completion: Any) -> str:
    """A completion as text: a string as is; chat messages (TRL's conversational form): the last one's content."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], Mapping):
        return str(completion[-1].get("content", ""))
    raise TypeError(f"completions must hold strings or lists of chat messages, got {type(completion).__name__}")


def _words(completion: Any) -> list[str]:
    # A decoder that keeps special tokens leaves "<eos>"/"<pad>" in the text; they are not part of the answer.
    return [w for w in re.split(r"\s+", _text(completion).strip()) if w and w not in ("<eos>", "<pad>")]


def _check_columns(completions: Sequence[Any], answer: Sequence[str] | None) -> Sequence[str]:
    if answer is None:
        raise ValueError("the dataset column 'answer' is missing: the counting rewards compare against it")
    if len(answer) != len(completions):
        raise ValueError(f"column 'answer' has {len(answer)} entries for {len(completions)} completions; "
                         "the trainer passes one entry per completion")
    return answer


def correctness(
    prompts: Sequence[Any], completions: Sequence[Any], answer: Sequence[str] | None = None, **columns: Any
) -> list[float | None]:
    """Fraction of the answer's digits that the completion has right, position by position.

    .. math::

        r(y) = \\frac{1}{K} \\sum_{k=1}^{K} \\mathbb{1}[y_k = a_k] \\in [0, 1]

    for the answer ``a`` (``answer`` column, ``K`` words) and the completion's words
    ``y`` (whitespace-split; a missing word is wrong, words after the ``K``-th are
    ignored: :func:`format_reward` judges length). The partial credit per digit makes
    the signal dense, as in the digit tasks of :mod:`rl2fx.trainer.tasks`. Completions
    may be strings or chat messages (the last message's content is read).

    >>> correctness(["count 1 2"] * 3, ["3 4", "3 9 9", "x"], answer=["3 4"] * 3)
    [1.0, 0.5, 0.0]
    """
    answers = _check_columns(completions, answer)
    out: list[float | None] = []
    for completion, ans in zip(completions, answers, strict=True):
        want, got = ans.split(), _words(completion)
        out.append(sum(1.0 for i, w in enumerate(want) if i < len(got) and got[i] == w) / len(want))
    return out


def format_reward(
    prompts: Sequence[Any], completions: Sequence[Any], answer: Sequence[str] | None = None, **columns: Any
) -> list[float | None]:
    """1 for a completion of exactly as many digits as the answer (then ``<eos>``), 0.5 for digits only, else 0.

    A completion cut by ``max_new_tokens`` before its ``<eos>`` has more digits
    than the answer when ``max_new_tokens = K + 1``, so full credit also asks the
    model to stop. The rule reads only the ``answer``'s length, never its digits.

    >>> format_reward(["count 1 2"] * 4, ["7 1", "7 1 3", "7 x", ""], answer=["3 4"] * 4)
    [1.0, 0.5, 0.0, 0.0]
    """
    answers = _check_columns(completions, answer)
    out: list[float | None] = []
    for completion, ans in zip(completions, answers, strict=True):
        got = _words(completion)
        digits_only = bool(got) and all(w in _DIGIT_WORDS for w in got)
        out.append(0.0 if not digits_only else 1.0 if len(got) == len(ans.split()) else 0.5)
    return out


#: the example's reward functions and their weights (pass as ``reward_funcs=`` / ``reward_weights=``).
#: The format reward weighs a quarter: it is learnt in a few dozen steps, and at a higher weight
#: the policy settles on well-formed constant answers ("6 6") before it learns to count.
REWARD_FUNCS = (correctness, format_reward)
REWARD_WEIGHTS = (1.0, 0.25)
#: modules of :func:`build_model` that :func:`lora_config` adapts (GPT-2's fused QKV, the
#: attention and MLP output projections, the MLP input projection)
LORA_TARGETS = ("c_attn", "c_proj", "c_fc")
#: GRPO settings under which ``tests/test_examples.py`` measures the rise of the reward
#: (plain prompts, LoRA from :func:`lora_config`, AdamW without weight decay, one update
#: epoch per rollout, no KL term, PPO clip 0.2, gradient norm clipped to 1, one CPU thread)
TRAINING: dict[str, Any] = {
    "lr": 3e-3, "prompts_per_step": 8, "responses_per_prompt": 8, "max_new_tokens": N_ANSWER + 1,
    "temperature": 1.0, "steps": 300, "update_epochs": 1, "clip": 0.2, "max_grad_norm": 1.0, "kl_coef": 0.0,
}


def lora_config(r: int = 8, lora_alpha: int = 16) -> Any:
    """The example's ``peft.LoraConfig``: rank ``r`` adapters on :data:`LORA_TARGETS`, no dropout.

    GPT-2 stores its projections as ``Conv1D`` (weights transposed), hence
    ``fan_in_fan_out=True``. LoRA: Hu et al., "LoRA: Low-Rank Adaptation of Large
    Language Models", 2021.

    >>> cfg = lora_config()
    >>> sorted(cfg.target_modules), cfg.r, cfg.fan_in_fan_out
    (['c_attn', 'c_fc', 'c_proj'], 8, True)
    """
    from peft import LoraConfig  # imported here: building the tokenizer or the data needs no peft

    check_range("r", r, 1, None)
    return LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=list(LORA_TARGETS),
                      fan_in_fan_out=True, task_type="CAUSAL_LM")


def _main() -> None:
    """Regenerate the shipped prompt sets (``python -m rl2fx.examples.counting``)."""
    write_jsonl(make_rows(400, seed=0), data_path("counting"))
    write_jsonl(make_rows(400, seed=1, chat=True), data_path("counting_chat"))


if __name__ == "__main__":
    _main()
