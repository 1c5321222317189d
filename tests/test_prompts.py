"""rl2fx.prompts: loading prompt sets, chat rendering, left-padded encoding, the resumable sampler.

Tokenizers are built locally (rl2fx.testing.tokenizers.char_tokenizer: a real
PreTrainedTokenizerFast over the ``tokenizers`` library); nothing is downloaded.
"""

from __future__ import annotations

import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rl2fx.prompts import (
    PROMPT_FILE_FORMATS,
    PromptDataError,
    PromptSampler,
    encode_prompts,
    load_prompts,
    prepare_prompts,
    render_prompt,
    repeat_columns,
)
from rl2fx.testing.tokenizers import char_tokenizer

ROWS = [
    {"prompt": "1+1=", "answer": "2", "level": 1},
    {"prompt": "12+30=", "answer": "42", "level": 2},
    {"prompt": "7+8=", "answer": "15", "level": 1},
]
CHAT = [
    {"prompt": [{"role": "system", "content": "add"}, {"role": "user", "content": "1+1"}], "answer": "2"},
    {"prompt": [{"role": "user", "content": "2+2", "name": "bob"}], "answer": "4"},
]
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m.role }}{% if m.name is defined %}({{ m.name }}){% endif %}"
            ": {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(PromptDataError) as info:
        fn(*args, **kwargs)
    return str(info.value)


# loading ---------------------------------------------------------------------------------------

def _same_rows(ds, rows):
    assert isinstance(ds, datasets.Dataset)
    assert ds.to_list() == rows


def test_load_list_and_dataset():
    _same_rows(load_prompts(ROWS), ROWS)
    ds = datasets.Dataset.from_list(ROWS)
    assert load_prompts(ds) is ds


def test_load_jsonl(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")  # a trailing blank line is fine
    _same_rows(load_prompts(p), ROWS)
    _same_rows(load_prompts(str(p)), ROWS)


def test_load_json_array_and_json_lines_named_json(tmp_path):
    a = tmp_path / "a.json"
    a.write_text(json.dumps(ROWS))
    _same_rows(load_prompts(a), ROWS)
    b = tmp_path / "b.json"
    b.write_text("\n".join(json.dumps(r) for r in ROWS))
    _same_rows(load_prompts(b), ROWS)


def test_load_parquet(tmp_path):
    p = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), p)
    _same_rows(load_prompts(p), ROWS)


def test_load_chat_jsonl_keeps_messages(tmp_path):
    p = tmp_path / "chat.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in CHAT))
    ds = load_prompts(p)
    assert ds[0]["prompt"][1] == {"role": "user", "content": "1+1", "name": None}  # arrow's key union
    assert ds[1]["prompt"][0]["name"] == "bob"


def test_rows_with_different_keys_keep_every_column():
    ds = load_prompts([{"prompt": "a"}, {"prompt": "b", "answer": "x"}])
    assert ds.column_names == ["prompt", "answer"] and ds["answer"] == [None, "x"]


def test_missing_prompt_column_names_column_name_and_columns(tmp_path):
    msg = _error(load_prompts, [{"question": "q", "answer": "a"}], name="eval_dataset")
    assert "eval_dataset has no 'prompt' column" in msg and "['question', 'answer']" in msg
    msg = _error(load_prompts, ROWS, prompt_column="question")
    assert "'question'" in msg and "['prompt', 'answer', 'level']" in msg
    assert load_prompts([{"question": "q"}], prompt_column="question").num_rows == 1


def test_file_errors_name_the_path_and_argument(tmp_path):
    msg = _error(load_prompts, tmp_path / "nope.jsonl")
    assert "train_dataset" in msg and "nope.jsonl" in msg and "does not exist" in msg
    bad = tmp_path / "data.csv"
    bad.write_text("prompt\nhi\n")
    msg = _error(load_prompts, bad, name="data.train_data_path")
    assert "data.train_data_path" in msg and "'.csv'" in msg and str(sorted(PROMPT_FILE_FORMATS)) in msg
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a"}\n{"prompt": \n')
    assert "line 2 is not valid JSON" in _error(load_prompts, broken)
    notrow = tmp_path / "notrow.jsonl"
    notrow.write_text('{"prompt": "a"}\n[1, 2]\n')
    assert "row 1" in _error(load_prompts, notrow)
    obj = tmp_path / "obj.json"
    obj.write_text(json.dumps({"data": ROWS}))
    assert "list of objects" in _error(load_prompts, obj)
    pq_bad = tmp_path / "bad.parquet"
    pq_bad.write_text("not parquet")
    assert "cannot read" in _error(load_prompts, pq_bad)


def test_empty_and_wrong_sources(tmp_path):
    assert "empty" in _error(load_prompts, [])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "empty" in _error(load_prompts, empty)
    assert "list of dicts" in _error(load_prompts, {"prompt": ["a"]})
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)})
    assert "pick a split" in _error(load_prompts, dd)
    assert "row 1 must be a dict" in _error(load_prompts, [{"prompt": "a"}, "b"])


@pytest.mark.parametrize("bad, where", [
    (3, "got 3 (int)"), (None, "got None"), ([], "empty list"), ([{"content": "x"}], "message 0"),
    (["hi"], "message 0"), ([{"role": "user", "content": "x"}, "hi"], "message 1"),
])
def test_bad_prompt_names_its_row(bad, where):
    first = [{"role": "user", "content": "ok"}] if isinstance(bad, list) else "ok"
    msg = _error(load_prompts, [{"prompt": first}, {"prompt": first}, {"prompt": bad}])
    assert "train_dataset row 2 (column 'prompt')" in msg and where in msg


def test_bad_prompt_in_a_dataset_names_its_row():
    ds = datasets.Dataset.from_dict({"prompt": ["ok", None, "ok"]})
    assert "row 1 (column 'prompt')" in _error(load_prompts, ds, name="eval_dataset")


def test_mixed_text_and_chat_in_one_column():
    msg = _error(load_prompts, [{"prompt": "a"}, {"prompt": [{"role": "user", "content": "b"}]}])
    assert "train_dataset row 1" in msg and "mix plain text and chat messages" in msg
    msg = _error(load_prompts, [{"prompt": "a", "answer": 1}, {"prompt": "b", "answer": "x"}])
    assert "train_dataset" in msg and "one kind" in msg  # another column: arrow's error, named


# rendering -------------------------------------------------------------------------------------

def test_render_text_passes_through():
    assert render_prompt("1+1=", char_tokenizer()) == "1+1="


def test_render_chat_messages_with_a_chat_template():
    tok = char_tokenizer(chat_template=TEMPLATE)
    ds = load_prompts(CHAT)  # through arrow: missing "name" keys come back as None
    assert render_prompt(ds[0]["prompt"], tok) == "<bos>system: add\nuser: 1+1\nassistant:"
    assert render_prompt(ds[1]["prompt"], tok) == "<bos>user(bob): 2+2\nassistant:"


def test_render_chat_without_template_says_how_to_fix():
    msg = _error(render_prompt, CHAT[0]["prompt"], char_tokenizer())
    assert "chat messages" in msg and "tokenizer.chat_template" in msg and "set one" in msg


# encoding --------------------------------------------------------------------------------------

def test_left_padding_values_and_tokenizer_unchanged():
    tok = char_tokenizer()
    before = tok.padding_side
    ids, mask = encode_prompts(["ab", "abcd", "c"], tok)
    a, b, c, d = (tok.convert_tokens_to_ids(x) for x in "abcd")
    pad = tok.pad_token_id
    assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape == (3, 4)
    assert ids.tolist() == [[pad, pad, a, b], [a, b, c, d], [pad, pad, pad, c]]
    assert mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]]
    assert tok.padding_side == before == "right"


def test_special_tokens_text_vs_chat():
    tok = char_tokenizer(add_bos=True, chat_template=TEMPLATE)
    bos = tok.bos_token_id
    _, ids, _ = prepare_prompts(["ab"], tok)
    assert ids[0, 0].item() == bos and ids.shape == (1, 3)
    # chat: the template writes <bos> itself; encoding adds no second one
    texts, ids, mask = prepare_prompts([CHAT[1]["prompt"]], tok)
    assert texts[0].startswith("<bos>user(bob)")
    assert ids[0, 0].item() == bos and ids[0, 1].item() != bos
    assert int(mask.sum()) == len(texts[0]) - len("<bos>") + 1
    with pytest.raises(PromptDataError, match="mixes plain text and chat"):
        prepare_prompts(["ab", CHAT[1]["prompt"]], tok)


def test_no_pad_token_names_it_and_suggests_eos():
    msg = _error(encode_prompts, ["ab", "a"], char_tokenizer(pad=False))
    assert "tokenizer.pad_token" in msg and "tokenizer.pad_token = tokenizer.eos_token" in msg


def test_too_long_prompt_names_row_and_lengths():
    msg = _error(encode_prompts, ["ab", "abcdef", "a"], char_tokenizer(), max_prompt_length=5)
    assert "row 1" in msg and "6 tokens" in msg and "max_prompt_length=5" in msg
    ids, _ = encode_prompts(["ab", "abcde"], char_tokenizer(), max_prompt_length=5)
    assert ids.shape == (2, 5)  # exactly at the limit is fine


def test_empty_prompt_and_non_strings():
    assert "row 1 is empty" in _error(encode_prompts, ["ab", ""], char_tokenizer())
    assert "render chat messages first" in _error(encode_prompts, ["ab", CHAT[0]["prompt"]], char_tokenizer())
    ids, mask = encode_prompts([], char_tokenizer())
    assert ids.shape == mask.shape == (0, 0)


# sampling --------------------------------------------------------------------------------------

def _ds(n=7):
    return load_prompts([{"prompt": f"p{i}", "answer": str(i), "level": i % 2} for i in range(n)])


def test_batch_holds_prompts_columns_and_indices():
    s = PromptSampler(_ds(), batch_size=3, generator=torch.Generator().manual_seed(0))
    b = s.next_batch()
    assert len(b.indices) == 3
    assert b.prompts == [f"p{i}" for i in b.indices]
    assert b.columns == {"answer": [str(i) for i in b.indices], "level": [i % 2 for i in b.indices]}


def test_every_prompt_once_per_epoch_and_reshuffled():
    s = PromptSampler(_ds(6), batch_size=3, generator=torch.Generator().manual_seed(1))
    epochs = [sum((s.next_batch().indices for _ in range(2)), []) for _ in range(4)]
    assert all(sorted(e) == list(range(6)) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1  # shuffled anew each epoch
    assert s.epoch == 3


def test_batches_cross_epoch_boundaries_without_skipping():
    s = PromptSampler(_ds(7), batch_size=3, generator=torch.Generator().manual_seed(2))
    stream = sum((s.next_batch().indices for _ in range(7)), [])  # 21 draws = 3 epochs
    assert [sorted(stream[i:i + 7]) for i in (0, 7, 14)] == [list(range(7))] * 3
    unshuffled = PromptSampler(_ds(7), batch_size=3, generator=torch.Generator(), shuffle=False)
    assert [unshuffled.next_batch().indices for _ in range(3)] == [[0, 1, 2], [3, 4, 5], [6, 0, 1]]


def test_same_seed_same_batches():
    def draws(seed):
        s = PromptSampler(_ds(), batch_size=2, generator=torch.Generator().manual_seed(seed))
        return [s.next_batch().indices for _ in range(10)]

    assert draws(3) == draws(3)
    assert draws(3) != draws(4)


def test_resume_draws_the_same_prompts(tmp_path):
    g = torch.Generator().manual_seed(5)
    s = PromptSampler(_ds(), batch_size=3, generator=g)
    for _ in range(4):  # into the second epoch
        s.next_batch()
    torch.save(s.state_dict(), tmp_path / "sampler.pt")
    expected = [s.next_batch().indices for _ in range(8)]  # crosses two more epochs
    # a fresh process: another generator seed, state restored from disk (weights_only)
    r = PromptSampler(_ds(), batch_size=3, generator=torch.Generator().manual_seed(999))
    r.load_state_dict(torch.load(tmp_path / "sampler.pt", weights_only=True))
    assert [r.next_batch().indices for _ in range(8)] == expected
    assert r.epoch == s.epoch


def test_sampler_errors():
    g = torch.Generator()
    with pytest.raises(ValueError, match=r"batch_size=8 is larger than the dataset \(7 prompts\)"):
        PromptSampler(_ds(), batch_size=8, generator=g)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        PromptSampler(_ds(), batch_size=0, generator=g)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        PromptSampler(_ds(), batch_size=2, generator=0)
    with pytest.raises(PromptDataError, match="'question'"):
        PromptSampler(_ds(), batch_size=2, generator=g, prompt_column="question")
    state = PromptSampler(_ds(), batch_size=2, generator=g).state_dict()
    with pytest.raises(ValueError, match="dataset of 7 prompts, this one has 6"):
        PromptSampler(_ds(6), batch_size=2, generator=g).load_state_dict(state)
    with pytest.raises(ValueError, match="not a permutation"):
        PromptSampler(_ds(), batch_size=2, generator=g).load_state_dict({**state, "permutation": torch.zeros(7)})
    with pytest.raises(KeyError, match="generator_state"):
        PromptSampler(_ds(), batch_size=2, generator=g).load_state_dict(
            {k: v for k, v in state.items() if k != "generator_state"})


def test_sampler_accepts_raw_rows():
    s = PromptSampler(ROWS, batch_size=3, generator=torch.Generator(), shuffle=False)
    assert s.next_batch().prompts == [r["prompt"] for r in ROWS]


def test_repeat_columns_contiguous_groups():
    assert repeat_columns({"a": [1, 2], "b": ["x", "y"]}, 2) == {"a": [1, 1, 2, 2], "b": ["x", "x", "y", "y"]}
    assert repeat_columns({"a": [1, 2]}, 1) == {"a": [1, 2]}
    with pytest.raises(ValueError, match="n"):
        repeat_columns({"a": [1]}, 0)
