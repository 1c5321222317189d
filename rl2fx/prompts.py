"""User prompt data: load a prompt set, render chat prompts, left-pad token ids, draw batches.

A prompt set is a table with a ``prompt`` column (the name is configurable) and
any other columns, which are handed to the reward functions
(:func:`rl2fx.rewards.score`), as in TRL's ``GRPOTrainer``. A prompt is either
plain text or a conversation, a list of ``{"role": ..., "content": ...}``
messages, rendered with the tokenizer's chat template and
``add_generation_prompt=True``.

The pieces, in the order a trainer uses them:

- :func:`load_prompts`: a ``datasets.Dataset``, a list of dicts, or a
  ``.jsonl`` / ``.json`` / ``.parquet`` file, checked row by row; read in memory,
  no network and no cache files;
- :class:`PromptSampler`: batches of rows, every prompt once per epoch,
  reshuffled each epoch from a ``torch.Generator``; resumable;
- :func:`prepare_prompts` (:func:`render_prompt` then :func:`encode_prompts`):
  text and left-padded ``input_ids`` / ``attention_mask``, the layout
  :func:`rl2fx.rollout.rollout` expects;
- :func:`repeat_columns`: the other columns, repeated for each of a prompt's
  ``G`` responses, to pass to the reward functions.

>>> from rl2fx.testing.tokenizers import char_tokenizer
>>> ds = load_prompts([{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": "4"}])
>>> batch = PromptSampler(ds, batch_size=2, generator=torch.Generator().manual_seed(0)).next_batch()
>>> texts, ids, mask = prepare_prompts(batch.prompts, char_tokenizer())
>>> sorted(texts), ids.shape, repeat_columns({"answer": ["2", "4"]}, 2)
(['1+1=', '2+2='], torch.Size([2, 4]), {'answer': ['2', '2', '4', '4']})
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rl2fx._typing import Int, Tensor, typechecked

if TYPE_CHECKING:  # pragma: no cover
    import datasets

__all__ = [
    "PromptDataError",
    "PROMPT_FILE_FORMATS",
    "load_prompts",
    "is_chat",
    "check_prompt",
    "render_prompt",
    "encode_prompts",
    "prepare_prompts",
    "PromptBatch",
    "PromptSampler",
    "repeat_columns",
]

#: File extension -> format that :func:`load_prompts` reads (the one list of supported files).
PROMPT_FILE_FORMATS: dict[str, str] = {".jsonl": "json lines", ".json": "json", ".parquet": "parquet"}

_NO_CHAT_TEMPLATE = (
    "the prompts are chat messages but the tokenizer has no chat template (tokenizer.chat_template "
    "is None); set one (tokenizer.chat_template = '<jinja template>'), use the tokenizer of a "
    "chat/instruct model, or give plain-text prompts")


class PromptDataError(ValueError):
    """A prompt set, a prompt or a tokenizer cannot be used; the message names the column, row or attribute."""


def is_chat(prompt: Any) -> bool:
    """Whether ``prompt`` is a conversation (a list of messages) rather than plain text.

    >>> is_chat("hi"), is_chat([{"role": "user", "content": "hi"}])
    (False, True)
    """
    return isinstance(prompt, (list, tuple))


def check_prompt(prompt: Any, where: str = "prompt") -> None:
    """Raise :class:`PromptDataError` naming ``where`` unless ``prompt`` is a string or a
    non-empty list of ``{"role": str, "content": ...}`` messages.

    >>> check_prompt([{"role": "user", "content": "hi"}])
    >>> check_prompt(3, "train_dataset row 7")
    Traceback (most recent call last):
    ...
    rl2fx.prompts.PromptDataError: train_dataset row 7: a prompt must be a string or a list of {"role", "content"} messages, got 3 (int)
    """
    if isinstance(prompt, str):
        return
    allowed = 'a prompt must be a string or a list of {"role", "content"} messages'
    if not is_chat(prompt):
        raise PromptDataError(f"{where}: {allowed}, got {prompt!r:.200} ({type(prompt).__name__})")
    if not prompt:
        raise PromptDataError(f"{where}: {allowed}, got an empty list")
    for j, m in enumerate(prompt):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or "content" not in m:
            raise PromptDataError(f"{where}: {allowed}; message {j} is {m!r:.200}")


def _read_json(path: Path, name: str) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    rows: Any = None
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            if "Extra data" not in str(e):  # anything but several documents: a broken file
                raise PromptDataError(f"{name}: {str(path)!r} is not valid JSON ({e})") from e
            rows = None  # several top-level values: JSON lines with a .json name
        if rows is not None and not isinstance(rows, list):
            keys = list(rows)[:10] if isinstance(rows, dict) else type(rows).__name__
            raise PromptDataError(
                f"{name}: {str(path)!r} must hold a list of objects (one per row) or JSON lines, "
                f"got a top-level {type(rows).__name__} ({keys})")
    if rows is None:
        rows = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise PromptDataError(f"{name}: {str(path)!r} line {lineno} is not valid JSON ({e})") from e
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise PromptDataError(f"{name}: row {i} of {str(path)!r} must be a JSON object, got {r!r:.200}")
    return rows


def _from_rows(rows: list[Any], name: str, prompt_column: str) -> datasets.Dataset:
    import datasets

    keys: dict[str, None] = {}
    for i, r in enumerate(rows):
        if not isinstance(r, Mapping):
            raise PromptDataError(f"{name}: row {i} must be a dict (column -> value), got {r!r:.200}")
        keys.update(dict.fromkeys(r))
    if prompt_column in keys:  # checked here, before arrow, so an error names the row
        _check_prompts([r.get(prompt_column) for r in rows], name, prompt_column)
    # the union of every row's keys (datasets.Dataset.from_list keeps only the first row's)
    table = {k: [r.get(k) for r in rows] for k in keys}
    try:
        return datasets.Dataset.from_dict(table)
    except Exception as e:  # pyarrow's type errors: one column holds values of several kinds
        first = (str(e).splitlines() or [""])[0]
        raise PromptDataError(
            f"{name}: cannot build a table from the rows; each column must hold values of one kind "
            f"in every row: {type(e).__name__}: {first}") from e


def _check_prompts(prompts: Sequence[Any], name: str, prompt_column: str) -> None:
    kind0 = None
    for i, p in enumerate(prompts):
        where = f"{name} row {i} (column {prompt_column!r})"
        check_prompt(p, where)
        if kind0 is None:
            kind0 = is_chat(p)
        elif is_chat(p) != kind0:
            raise PromptDataError(
                f"{where}: the prompts mix plain text and chat messages (row 0 is "
                f"{'chat' if kind0 else 'text'}, this row is not); use one kind per dataset")


def load_prompts(
    source: Any,
    *,
    prompt_column: str = "prompt",
    name: str = "train_dataset",
) -> datasets.Dataset:
    """A checked prompt set as a ``datasets.Dataset``.

    ``source`` is a ``datasets.Dataset``, a list of dicts (one per row), or a path
    to a ``.jsonl`` (one JSON object per line), ``.json`` (a list of objects, or
    JSON lines) or ``.parquet`` file (:data:`PROMPT_FILE_FORMATS`). Files are read
    into memory with ``json`` / ``pyarrow``: nothing is downloaded and no cache
    is written. Every row's ``prompt_column`` must be a string or a list of
    ``{"role", "content"}`` messages (:func:`check_prompt`); the other columns
    are kept for the reward functions. Errors raise :class:`PromptDataError`
    naming ``name`` (the argument the data came from) and the path, column or row.

    >>> load_prompts([{"prompt": "hi", "answer": 1}]).column_names
    ['prompt', 'answer']
    >>> load_prompts([{"question": "hi"}])
    Traceback (most recent call last):
    ...
    rl2fx.prompts.PromptDataError: train_dataset has no 'prompt' column (prompt_column='prompt'); its columns: ['question']
    """
    import datasets

    if isinstance(source, datasets.Dataset):
        ds = source
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        fmt = PROMPT_FILE_FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise PromptDataError(
                f"{name}: {str(path)!r} has an unsupported extension {path.suffix!r}; "
                f"allowed: {sorted(PROMPT_FILE_FORMATS)}")
        if not path.is_file():
            raise PromptDataError(f"{name}: file {str(path)!r} does not exist (relative to {os.getcwd()!r})")
        if fmt == "parquet":
            import pyarrow.parquet as pq

            try:
                ds = datasets.Dataset(pq.read_table(path))
            except Exception as e:
                first = (str(e).splitlines() or [""])[0]
                raise PromptDataError(f"{name}: cannot read {str(path)!r} as parquet: {first}") from e
        else:
            ds = _from_rows(_read_json(path, name), f"{name} ({str(path)!r})", prompt_column)
    elif isinstance(source, list):
        ds = _from_rows(source, name, prompt_column)
    else:
        hint = " (a DatasetDict: pick a split, e.g. ds['train'])" if isinstance(source, datasets.DatasetDict) else ""
        raise PromptDataError(
            f"{name} must be a datasets.Dataset, a list of dicts, or a path to a "
            f"{'/'.join(PROMPT_FILE_FORMATS)} file, got {type(source).__name__}{hint}")
    if len(ds) == 0:
        raise PromptDataError(f"{name} is empty (0 rows); it needs at least one prompt")
    if prompt_column not in ds.column_names:
        raise PromptDataError(
            f"{name} has no {prompt_column!r} column (prompt_column={prompt_column!r}); "
            f"its columns: {ds.column_names}")
    _check_prompts(ds[prompt_column], name, prompt_column)
    return ds


def render_prompt(prompt: Any, tokenizer: Any) -> str:
    """The text a model sees for ``prompt``: a string as it is; chat messages through
    ``tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)``.

    Message keys whose value is ``None`` (other than ``content``) are dropped
    first: a table stores the union of every message's keys and fills the missing
    ones with ``None``, which chat templates read as present (``is defined``).

    >>> from rl2fx.testing.tokenizers import char_tokenizer
    >>> tok = char_tokenizer(chat_template="{% for m in messages %}{{ m.role }}: {{ m.content }}\\n"
    ...                      "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    >>> render_prompt([{"role": "user", "content": "2+2=?", "name": None}], tok)
    'user: 2+2=?\\nassistant:'
    """
    check_prompt(prompt)
    if isinstance(prompt, str):
        return prompt
    if getattr(tokenizer, "chat_template", None) is None:
        raise PromptDataError(_NO_CHAT_TEMPLATE)
    messages = [{k: v for k, v in m.items() if v is not None or k == "content"} for m in prompt]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if not isinstance(text, str):
        raise PromptDataError(f"tokenizer.apply_chat_template(..., tokenize=False) returned "
                              f"{type(text).__name__}, expected str")
    return text


@typechecked
def encode_prompts(
    texts: Sequence[Any],
    tokenizer: Any,
    *,
    max_prompt_length: int | None = None,
    add_special_tokens: bool = True,
) -> tuple[Int[Tensor, "n p"], Int[Tensor, "n p"]]:
    """Tokenize ``texts`` into left-padded ``(input_ids, attention_mask)``, int64 ``[n, p]``.

    ``p`` is the longest prompt; shorter rows get ``pad_token_id`` on the *left*
    (``attention_mask`` 0 there), so every row's last column is its last prompt
    token and generated tokens follow at the same index in every row, the layout
    :func:`rl2fx.rollout.rollout` needs. The padding side is chosen for this call
    only; the tokenizer is not changed. ``add_special_tokens`` is passed to the
    tokenizer (its default ``True`` adds e.g. Llama's ``<s>``; pass ``False`` for
    text that already holds them, such as a rendered chat template).

    Nothing is truncated: a prompt longer than ``max_prompt_length`` tokens, or one
    of 0 tokens, raises :class:`PromptDataError` naming its row; a tokenizer
    without a pad token raises naming ``tokenizer.pad_token``.

    >>> from rl2fx.testing.tokenizers import char_tokenizer
    >>> ids, mask = encode_prompts(["ab", "abc"], char_tokenizer())
    >>> ids.tolist(), mask.tolist()
    ([[0, 4, 5], [4, 5, 6]], [[0, 1, 1], [1, 1, 1]])
    """
    if max_prompt_length is not None and max_prompt_length < 1:
        raise PromptDataError(f"max_prompt_length must be a positive int or None, got {max_prompt_length}")
    if getattr(tokenizer, "pad_token", None) is None:
        raise PromptDataError(
            "tokenizer.pad_token is None: prompts of different lengths need a pad token to be "
            "left-padded; set one, e.g. tokenizer.pad_token = tokenizer.eos_token")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            hint = "; render chat messages first (render_prompt)" if is_chat(t) else ""
            raise PromptDataError(f"prompt row {i} must be a string to encode, got {type(t).__name__}{hint}")
    if not texts:
        empty = torch.zeros(0, 0, dtype=torch.long)
        return empty, empty.clone()
    enc = tokenizer(texts, padding=True, padding_side="left", add_special_tokens=add_special_tokens,
                    return_attention_mask=True, return_tensors="pt")
    ids = enc["input_ids"].long()
    mask = enc["attention_mask"].long()
    lengths = mask.sum(-1)
    for i, n in enumerate(lengths.tolist()):
        if n == 0:
            raise PromptDataError(f"prompt row {i} is empty: it has 0 tokens ({texts[i]!r})")
        if max_prompt_length is not None and n > max_prompt_length:
            raise PromptDataError(
                f"prompt row {i} has {n} tokens, more than max_prompt_length={max_prompt_length}; "
                f"raise max_prompt_length or shorten/remove the prompt (nothing is truncated)")
    if not bool((mask[:, -1] == 1).all()):
        raise PromptDataError(
            f"{type(tokenizer).__name__} did not left-pad (padding_side='left' was ignored); "
            f"rollouts need left-padded prompts")
    return ids, mask


def prepare_prompts(
    prompts: Sequence[Any],
    tokenizer: Any,
    *,
    max_prompt_length: int | None = None,
) -> tuple[list[str], Int[Tensor, "n p"], Int[Tensor, "n p"]]:
    """Render (:func:`render_prompt`) and encode (:func:`encode_prompts`) one batch of raw prompts.

    Returns ``(texts, input_ids, attention_mask)``. Plain-text prompts are encoded
    with the tokenizer's special tokens (``add_special_tokens=True``); rendered
    chat prompts without (``False``), because the chat template writes them itself
    and a second ``<bos>`` would be out of distribution (TRL's ``GRPOTrainer``
    encodes every prompt with ``add_special_tokens=False``). A batch must be all
    text or all chat.

    >>> from rl2fx.testing.tokenizers import char_tokenizer
    >>> texts, ids, mask = prepare_prompts(["ab"], char_tokenizer(add_bos=True))
    >>> texts, ids.tolist()
    (['ab'], [[1, 4, 5]])
    """
    prompts = list(prompts)
    kinds = {is_chat(p) for p in prompts}
    if len(kinds) > 1:
        first = next(i for i, p in enumerate(prompts) if is_chat(p) != is_chat(prompts[0]))
        raise PromptDataError(
            f"a prompt batch mixes plain text and chat messages (row 0 is "
            f"{'chat' if is_chat(prompts[0]) else 'text'}, row {first} is not); use one kind per dataset")
    texts = []
    for i, p in enumerate(prompts):
        check_prompt(p, f"prompt row {i}")
        texts.append(render_prompt(p, tokenizer))
    chat = kinds == {True}
    ids, mask = encode_prompts(texts, tokenizer, max_prompt_length=max_prompt_length,
                               add_special_tokens=not chat)
    return texts, ids, mask


def repeat_columns(columns: Mapping[str, Sequence[Any]], n: int) -> dict[str, list[Any]]:
    """Each row repeated ``n`` times in place (``[a, b] -> [a, a, b, b]`` for ``n = 2``).

    The ``responses_per_prompt`` responses of one prompt are contiguous in a rollout
    (the group estimators' layout), so a prompt's columns repeated this way line up
    with its completions for :func:`rl2fx.rewards.score`.

    >>> repeat_columns({"answer": ["2", "4"], "id": [0, 1]}, 3)
    {'answer': ['2', '2', '2', '4', '4', '4'], 'id': [0, 0, 0, 1, 1, 1]}
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n (responses per prompt) must be a positive int, got {n!r}")
    return {k: [v for v in vals for _ in range(n)] for k, vals in columns.items()}


@dataclass(frozen=True)
class PromptBatch:
    """Rows drawn by :class:`PromptSampler`.

    Attributes:
        prompts: the raw prompt values (strings or message lists), not yet rendered.
        columns: every other column of those rows, column -> list of values.
        indices: the rows' indices in the dataset.
    """

    prompts: list[Any]
    columns: dict[str, list[Any]] = field(default_factory=dict)
    indices: list[int] = field(default_factory=list)


class PromptSampler:
    """Batches of ``batch_size`` rows, each prompt once per epoch, epochs without end.

    The rows are drawn from the stream ``perm_0 ++ perm_1 ++ ...``, one
    permutation of the dataset per epoch (``torch.randperm`` with ``generator``;
    the identity with ``shuffle=False``), cut into consecutive batches. A batch
    that crosses an epoch boundary takes the end of one permutation and the start
    of the next, so every prompt is drawn exactly once per epoch and none is
    skipped; with shuffling such a batch may repeat a prompt.

    :meth:`state_dict` holds the epoch, the position in the current permutation,
    the permutation and the generator's state: a sampler restored with
    :meth:`load_state_dict` draws the same batches the original would have.

    >>> ds = load_prompts([{"prompt": p} for p in "abc"])
    >>> s = PromptSampler(ds, batch_size=2, generator=torch.Generator(), shuffle=False)
    >>> [s.next_batch().prompts for _ in range(3)], s.epoch
    ([['a', 'b'], ['c', 'a'], ['b', 'c']], 1)
    """

    def __init__(
        self,
        dataset: Any,
        *,
        batch_size: int,
        generator: torch.Generator,
        prompt_column: str = "prompt",
        shuffle: bool = True,
    ) -> None:
        import datasets

        if not isinstance(dataset, datasets.Dataset):
            dataset = load_prompts(dataset, prompt_column=prompt_column)
        elif prompt_column not in dataset.column_names:
            raise PromptDataError(
                f"dataset has no {prompt_column!r} column (prompt_column={prompt_column!r}); "
                f"its columns: {dataset.column_names}")
        n = len(dataset)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if batch_size > n:
            raise ValueError(
                f"batch_size={batch_size} is larger than the dataset ({n} prompts); lower the number "
                f"of prompts per batch or add prompts")
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.generator = generator
        self.prompt_column = prompt_column
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self.position = 0
        self.permutation = self._draw()

    def _draw(self) -> Tensor:
        n = len(self.dataset)
        if self.shuffle:
            return torch.randperm(n, generator=self.generator)
        return torch.arange(n)

    def _take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            if self.position == len(self.permutation):
                self.permutation = self._draw()
                self.epoch += 1
                self.position = 0
            m = min(k - len(out), len(self.permutation) - self.position)
            out += self.permutation[self.position:self.position + m].tolist()
            self.position += m
        return out

    def next_batch(self) -> PromptBatch:
        """The next ``batch_size`` rows: prompts, the other columns, and their indices."""
        indices = self._take(self.batch_size)
        rows = dict(self.dataset[indices])
        prompts = list(rows.pop(self.prompt_column))
        return PromptBatch(prompts=prompts, columns={k: list(v) for k, v in rows.items()}, indices=indices)

    def state_dict(self) -> dict[str, Any]:
        """What :meth:`load_state_dict` needs to continue the same stream of batches."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "permutation": self.permutation.clone(),
            "generator_state": self.generator.get_state(),
            "num_prompts": len(self.dataset),
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state`` (from :meth:`state_dict` of a sampler over the same dataset)."""
        required = ("epoch", "position", "permutation", "generator_state", "num_prompts", "shuffle")
        missing = [k for k in required if k not in state]
        if missing:
            raise KeyError(f"PromptSampler state is missing {missing}; expected keys {list(required)}")
        n = len(self.dataset)
        if state["num_prompts"] != n:
            raise ValueError(
                f"PromptSampler state is for a dataset of {state['num_prompts']} prompts, this one has {n}")
        perm = torch.as_tensor(state["permutation"], dtype=torch.long)
        if perm.shape != (n,) or not torch.equal(perm.sort().values, torch.arange(n)):
            raise ValueError(f"PromptSampler state's permutation is not a permutation of range({n})")
        if not 0 <= int(state["position"]) <= n:
            raise ValueError(f"PromptSampler state's position must be in [0, {n}], got {state['position']}")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.permutation = perm.clone()
        self.shuffle = bool(state["shuffle"])
        self.generator.set_state(state["generator_state"])
