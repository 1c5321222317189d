"""The shipped counting example (rl2fx.examples.counting): assets, reward functions, and that RL learns it.

The learning test chains the core pieces a user's own loop would (rollout ->
reward functions -> old log-probs -> GRPO advantages -> train_step) on the example's
GPT-2 with LoRA adapters, from random weights.
"""

from __future__ import annotations

import json
import random
import statistics
import tomllib
from pathlib import Path

import pytest
import torch

from rl2fx.examples import counting as ex
from rl2fx.returns import advantages
from rl2fx.rollout import rollout, scatter_last
from rl2fx.step import compute_logprobs, make_ppo_loss, train_step

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- tokenizer
def test_tokenizer_ids_padding_and_decode():
    tok = ex.build_tokenizer()
    assert len(tok) == len(ex.VOCAB) == 19
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == ("<pad>", "<bos>", "<eos>", "<unk>")
    assert tok.padding_side == "left"
    enc = tok(["count 1 2", "count 7 8 9 0 1"], padding=True, return_tensors="pt")
    assert enc["attention_mask"].tolist() == [[0, 0, 0, 1, 1, 1, 1], [1] * 7]
    assert enc["input_ids"][0, :3].tolist() == [tok.pad_token_id] * 3
    assert tok.convert_ids_to_tokens(enc["input_ids"][1]) == ["<bos>", "count", "7", "8", "9", "0", "1"]
    # every digit is its own token; an unknown word is <unk>, not dropped
    assert tok.convert_ids_to_tokens(tok("12 ten", add_special_tokens=False)["input_ids"]) == ["1", "2", "<unk>"]
    ids = tok("3 4", add_special_tokens=False)["input_ids"] + [tok.eos_token_id, tok.pad_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == "3 4"


def test_chat_template_renders_and_round_trips(tmp_path):
    tok = ex.build_tokenizer()
    msgs = [{"role": "system", "content": "count"}, {"role": "user", "content": "count 3 4"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == "<bos><|system|> count <|end|> <|user|> count 3 4 <|end|> <|assistant|>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids)[:3] == ["<bos>", "<|system|>", "count"]  # markers stay whole
    assert ids[-1] == ex.VOCAB["<|assistant|>"] and ids.count(ex.VOCAB["<bos>"]) == 1
    assert tok.apply_chat_template(msgs, add_generation_prompt=False, tokenize=False).endswith("<|end|> ")
    # saved and reloaded like a hub tokenizer: same ids, same template
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    back = AutoTokenizer.from_pretrained(tmp_path)
    assert back(text, add_special_tokens=False)["input_ids"] == ids
    assert back.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == text
    assert back.padding_side == "left"


def test_chat_template_rejects_unknown_role():
    tok = ex.build_tokenizer()
    with pytest.raises(Exception, match="chat role must be system, user or assistant, got tool"):
        tok.apply_chat_template([{"role": "tool", "content": "3"}], tokenize=False)


# ---------------------------------------------------------------- model
def test_build_model_config_and_determinism():
    tok = ex.build_tokenizer()
    m = ex.build_model(tok, seed=3)
    cfg = m.config
    assert type(m).__name__ == "GPT2LMHeadModel"
    assert (cfg.vocab_size, cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (19, 0, 1, 2)
    assert (cfg.resid_pdrop, cfg.embd_pdrop, cfg.attn_pdrop) == (0.0, 0.0, 0.0)
    assert m.lm_head.weight.data_ptr() == m.transformer.wte.weight.data_ptr()  # tied
    state = torch.get_rng_state()
    again = ex.build_model(tok, seed=3)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG stream is untouched
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), again.parameters(), strict=True))
    other = ex.build_model(tok, seed=4)
    assert not torch.equal(m.transformer.wte.weight, other.transformer.wte.weight)
    # initializer_range sets the embeddings' scale (see build_model's docstring)
    std = ex.build_model(tok, initializer_range=0.1).transformer.wte.weight.std().item()
    assert 0.08 < std < 0.12


def test_build_model_bad_input():
    tok = ex.build_tokenizer()
    with pytest.raises(ValueError, match=r"n_embd \(30\) must be divisible by n_head \(4\)"):
        ex.build_model(tok, n_embd=30)
    with pytest.raises(ValueError, match="n_layer"):
        ex.build_model(tok, n_layer=0)
    with pytest.raises(ValueError, match="initializer_range"):
        ex.build_model(tok, initializer_range=0.0)
    tok.pad_token = None
    with pytest.raises(ValueError, match="tokenizer.pad_token_id is None"):
        ex.build_model(tok)


# ---------------------------------------------------------------- data
def _continuation(prompt: str) -> str:
    digits = [int(w) for w in prompt.split()[1:]]
    assert prompt.split()[0] == "count" and all((b - a) % 10 == 1 for a, b in zip(digits[:-1], digits[1:], strict=True))
    return " ".join(str((digits[-1] + k) % 10) for k in range(1, ex.N_ANSWER + 1))


@pytest.mark.parametrize("name", sorted(ex.DATA_FILES))
def test_shipped_prompt_sets(name):
    path = ex.data_path(name)
    assert path.stat().st_size < 100_000
    rows = ex.load_rows(name)
    chat = name.endswith("_chat")
    # the file is exactly what the generator writes (regenerate with python -m rl2fx.examples.counting)
    assert rows == ex.make_rows(400, seed=1 if chat else 0, chat=chat)
    lengths = set()
    for row in rows:
        assert set(row) == {"prompt", "answer"}
        prompt = row["prompt"][0]["content"] if chat else row["prompt"]
        if chat:
            assert row["prompt"] == [{"role": "user", "content": prompt}]
        assert row["answer"] == _continuation(prompt)
        lengths.add(len(prompt.split()))
    assert lengths == set(range(3, 8))  # 2..6 digits after "count": batches are left-padded
    # every column is a plain JSON value a datasets.Dataset reads back
    import datasets

    ds = datasets.load_dataset("json", data_files=str(path), split="train")
    assert ds.column_names == ["prompt", "answer"] and len(ds) == 400
    assert ds[0] == rows[0]


def test_prompt_sets_are_package_data():
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["rl2fx"]
    shipped = {p.relative_to(ROOT / "rl2fx").as_posix() for p in (ROOT / "rl2fx").glob("examples/data/*")}
    matched = {f for f in shipped if any(Path(f).match(pat) for pat in patterns)}
    assert shipped == matched == {"examples/" + f for f in ex.DATA_FILES.values()}


def test_make_rows_and_write_jsonl(tmp_path):
    rows = ex.make_rows(50, seed=7, min_length=4, max_length=4)
    assert {len(r["prompt"].split()) for r in rows} == {5}
    out = ex.write_jsonl(rows, tmp_path / "x.jsonl")
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    with pytest.raises(ValueError, match="max_length"):
        ex.make_rows(3, min_length=4, max_length=3)
    with pytest.raises(ValueError, match="n must be"):
        ex.make_rows(0)


# ---------------------------------------------------------------- rewards
def test_correctness_partial_credit():
    answer = ["3 4"] * 6
    comps = ["3 4", "3 5", "9 4", "4 3", "3", "3 4 5 6"]
    assert ex.correctness(["p"] * 6, comps, answer=answer) == [1.0, 0.5, 0.5, 0.0, 0.5, 1.0]
    # special tokens left in by a decoder are not words of the answer
    assert ex.correctness(["p"], ["3 4 <eos> <pad>"], answer=["3 4"]) == [1.0]
    # TRL's conversational completions: the last message's content is scored
    chat = [[{"role": "assistant", "content": "3 9"}]]
    assert ex.correctness([[{"role": "user", "content": "count 1 2"}]], chat, answer=["3 4"]) == [0.5]


def test_format_reward():
    answer = ["3 4"] * 6
    comps = ["7 1", "7 1 3", "7", "7 count", "", "  5   6  "]
    assert ex.format_reward(["p"] * 6, comps, answer=answer) == [1.0, 0.5, 0.5, 0.0, 0.0, 1.0]
    assert ex.format_reward(["p"], ["7 1 <eos>"], answer=["3 4"]) == [1.0]


@pytest.mark.parametrize("fn", ex.REWARD_FUNCS)
def test_reward_bad_input(fn):
    with pytest.raises(ValueError, match="column 'answer' is missing"):
        fn(["p"], ["3 4"])
    with pytest.raises(ValueError, match="column 'answer' has 1 entries for 2 completions"):
        fn(["p", "p"], ["3 4", "3 4"], answer=["3 4"])
    with pytest.raises(TypeError, match="completions must hold strings or lists of chat messages, got int"):
        fn(["p"], [3], answer=["3 4"])
    # other dataset columns are accepted and ignored, as the trainer passes every column
    assert fn(["p"], ["3 4"], answer=["3 4"], length=[2]) == [1.0]


# ---------------------------------------------------------------- log-probs on left-padded prompts
def test_logprobs_match_generate_through_peft_on_left_padded_prompts():
    """The example's point: GPT-2 has absolute positions, so left-padded rows need position_ids.

    compute_logprobs (through the PEFT wrapper) reproduces the sampler's own log-probs;
    the same forward without position_ids is off by a large margin (the negative control).
    """
    from peft import get_peft_model

    from rl2fx.rollout import response_mask

    torch.manual_seed(0)
    tok = ex.build_tokenizer()
    model = get_peft_model(ex.build_model(tok, seed=0), ex.lora_config()).eval()
    with torch.no_grad():  # nonzero adapters, so that they take part in both passes
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    enc = tok([r["prompt"] for r in ex.load_rows()[:6]], padding=True, return_tensors="pt")
    assert len(set(enc["attention_mask"].sum(1).tolist())) > 1  # ragged left padding
    out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], do_sample=True,
                         max_new_tokens=3, output_logits=True, return_dict_in_generate=True,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    n_prompt = enc["input_ids"].shape[1]
    resp = out.sequences[:, n_prompt:]
    rmask = response_mask(resp, tok.eos_token_id)
    sampler = torch.stack([torch.log_softmax(x.float(), -1) for x in out.logits], 1)
    sampler = sampler.gather(-1, resp.unsqueeze(-1)).squeeze(-1)
    attn = torch.cat([enc["attention_mask"], rmask.long()], 1)
    with torch.no_grad():
        lp, _ = compute_logprobs(model, {"input_ids": out.sequences, "attention_mask": attn, "response_ids": resp})
        logits = model(input_ids=out.sequences, attention_mask=attn).logits[:, n_prompt - 1:-1]
    naive = torch.log_softmax(logits.float(), -1).gather(-1, resp.unsqueeze(-1)).squeeze(-1)
    keep = rmask > 0
    assert (lp - sampler)[keep].abs().max() <= 1e-5
    assert (naive - sampler)[keep].abs().max() > 1e-2


# ---------------------------------------------------------------- GRPO with LoRA, from random weights
def _grpo(seed: int, steps: int, *, data: str = "counting") -> tuple[dict[str, list[float]], torch.nn.Module]:
    """The example's GRPO loop with LoRA (settings: ex.TRAINING): per-step mean rewards, and the model."""
    from peft import get_peft_model

    hp = ex.TRAINING
    torch.manual_seed(seed)
    tok = ex.build_tokenizer()
    model = get_peft_model(ex.build_model(tok, seed=seed), ex.lora_config())
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=hp["lr"], weight_decay=0.0)
    loss_fn = make_ppo_loss(clip=hp["clip"], kl_coef=hp["kl_coef"], temperature=hp["temperature"])
    rows, rng = ex.load_rows(data), random.Random(seed)
    n, g = hp["prompts_per_step"], hp["responses_per_prompt"]
    hist: dict[str, list[float]] = {"correctness": [], "format": [], "reward": [], "padded": []}
    for _ in range(steps):
        pick = [rows[rng.randrange(len(rows))] for _ in range(n)]
        if data.endswith("_chat"):
            texts = [tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False) for r in pick]
            enc = tok(texts, padding=True, return_tensors="pt", add_special_tokens=False)
        else:
            enc = tok([r["prompt"] for r in pick], padding=True, return_tensors="pt")
        batch = rollout(model, enc["input_ids"], prompt_mask=enc["attention_mask"], responses_per_prompt=g,
                        max_new_tokens=hp["max_new_tokens"], eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, temperature=hp["temperature"])
        completions = tok.batch_decode(batch["response_ids"], skip_special_tokens=True)
        prompts = [r["prompt"] for r in pick for _ in range(g)]
        answer = [r["answer"] for r in pick for _ in range(g)]
        per_fn = [torch.tensor(f(prompts, completions, answer=answer)) for f in ex.REWARD_FUNCS]
        scores = sum(w * r for w, r in zip(ex.REWARD_WEIGHTS, per_fn, strict=True))
        mask = batch["response_mask"]
        with torch.no_grad():
            old, _ = compute_logprobs(model, batch, temperature=hp["temperature"])
        adv = advantages("grpo", rewards=scatter_last(scores, mask), group_size=g, mask=mask)["advantages"]
        batch.update(old_logprobs=old, advantages=(adv.unsqueeze(-1) if adv.ndim == 1 else adv) * mask)
        out = train_step(model, opt, batch, loss_fn=loss_fn, max_grad_norm=hp["max_grad_norm"])
        assert all(torch.isfinite(torch.tensor(v)) for v in (out["loss"], out["grad_norm"]))
        hist["correctness"].append(per_fn[0].mean().item())
        hist["format"].append(per_fn[1].mean().item())
        hist["reward"].append(scores.mean().item())
        hist["padded"].append(float((enc["attention_mask"] == 0).any()))
    return hist, model


@pytest.mark.parametrize("data", sorted(ex.DATA_FILES))
def test_grpo_lora_smoke(data):
    """Three steps: the whole chain runs on left-padded prompts, and only the adapters change."""
    torch.set_num_threads(1)
    base = {k: v.clone() for k, v in ex.build_model(ex.build_tokenizer(), seed=0).state_dict().items()}
    hist, model = _grpo(0, 3, data=data)
    assert max(hist["padded"]) == 1.0
    assert all(0.0 <= c <= 1.0 for c in hist["correctness"])
    changed = {k for k, v in model.named_parameters() if "lora_" in k and "lora_B" in k and v.abs().sum() > 0}
    assert changed  # lora_B starts at zero: a nonzero one was trained
    for name, p in model.get_base_model().named_parameters():
        if "lora_" not in name:
            key = name.replace(".base_layer", "")
            assert torch.equal(p, base[key]), name  # base weights are frozen


@pytest.mark.slow  # ~200 GRPO steps: 30-60 s on one CPU thread
def test_grpo_lora_learns_counting():
    """From random weights, LoRA-only GRPO lifts the correctness reward well above its start.

    Measured (ex.TRAINING, 300 steps, first vs last 20 steps, one thread): seeds 0, 1, 2 rose
    0.11 -> 0.70, 0.11 -> 0.47, 0.09 -> 0.72 (chance 1/19 per digit at a uniform policy).
    The chat prompt set learns more slowly under the same settings (0.09 -> 0.35,
    0.10 -> 0.08, 0.11 -> 0.18): the answer sits two tokens behind the generation point.
    """
    torch.set_num_threads(1)
    hist, _ = _grpo(0, 200)
    start, end = statistics.mean(hist["correctness"][:20]), statistics.mean(hist["correctness"][-20:])
    assert start < 0.2 and end > start + 0.25, (start, end)
    # the weighted reward (what a trainer optimises) rises with it
    assert statistics.mean(hist["reward"][-20:]) > statistics.mean(hist["reward"][:20]) + 0.25
