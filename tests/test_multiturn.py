"""Multi-turn rollouts: token-in-token-out, behaviour log-probs, masks, segments, failures, the shipped task."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from rl2fx.envs import EnvError
from rl2fx.envs_examples import guess_number
from rl2fx.experience import make_experience
from rl2fx.logprobs import response_logprobs
from rl2fx.multiturn import from_trajectories, multi_turn_rollout, multi_turn_stats, to_trajectories
from rl2fx.prompts import load_prompts
from rl2fx.returns import advantages, gae
from rl2fx.testing.reference import ref_gae, ref_grpo
from rl2fx.testing.tokenizers import char_tokenizer


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def _model(kind: str, vocab: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if kind == "gpt2":  # absolute position embeddings: wrong positions would show in the log-probs
        m = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=256,
                                         bos_token_id=1, eos_token_id=2))
    else:
        m = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=0))
    return m.eval()


def _turn_env(done_at: int = 99, *, extend: bool = True):
    """Reward = turn number on every turn; feedback text appended; done at ``done_at`` (odd samples one turn earlier)."""

    def env_step(s):
        done = s.turn >= done_at - (s.index % 2)
        nxt = None if done else (s.state_text + s.action_text + f"\nok {s.turn}:" if extend or s.turn != 1
                                 else f"fresh {s.index}:")
        return {"next_state": nxt, "done": done, "reward": float(s.turn)}

    return env_step


class _Recorder:
    """Wraps ``model.generate`` and keeps each call's inputs and the tokens it returned."""

    def __init__(self, model):
        self.calls = []
        self._gen = model.generate
        model.generate = self

    def __call__(self, **kw):
        out = self._gen(**kw)
        p = kw["input_ids"].shape[1]
        self.calls.append({"input_ids": kw["input_ids"].clone(), "attention_mask": kw["attention_mask"].clone(),
                           "new": out.sequences[:, p:].clone()})
        return out


def _rollout(model, tok, env, *, n=2, g=3, max_turns=3, max_new_tokens=4, seed=1, **kw):
    torch.manual_seed(seed)
    rows = [{"i": i} for i in range(n)]
    texts = ["go:", "start now:"][:n] + ["x:"] * max(0, n - 2)
    return multi_turn_rollout(model, tok, rows, env, prompt_texts=texts, responses_per_prompt=g, max_turns=max_turns,
                              max_new_tokens=max_new_tokens, **kw)


def _cut(row: list[int], eos: int) -> list[int]:
    return row[: row.index(eos) + 1] if eos in row else row


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_tokens_fed_to_training_are_the_sampled_ones(kind, tok):
    m = _model(kind, len(tok))
    rec = _Recorder(m)
    out = _rollout(m, tok, _turn_env(done_at=3), max_turns=3)
    eos, b = tok.eos_token_id, out["turns"].shape[0]
    assert out["sample_index"].tolist() == list(range(b))  # no segment breaks: one row per trajectory
    turns = out["turns"].tolist()
    assert turns == [3, 2] * 3 and len(rec.calls) == 3
    roundtrip_differs = False
    for k, call in enumerate(rec.calls, start=1):
        active = [i for i in range(b) if turns[i] >= k]  # finished trajectories left the batch
        assert call["new"].shape[0] == len(active)
        for row, i in enumerate(active):
            sampled = _cut(call["new"][row].tolist(), eos)
            sel = (out["turn_ids"][i] == k) & (out["response_mask"][i] > 0)
            assert out["response_ids"][i][sel].tolist() == sampled
            # the context generate saw is exactly the row's tokens before this turn
            seen = call["input_ids"][row][call["attention_mask"][row] > 0].tolist()
            full = out["input_ids"][i][out["attention_mask"][i] > 0].tolist()
            assert full[: len(seen)] == seen
            text = tok.decode(sampled, skip_special_tokens=True)
            roundtrip_differs |= tok(text, add_special_tokens=False)["input_ids"] != sampled
    # decode -> encode is not the identity on these samples (special tokens, eos): re-tokenising would differ
    assert roundtrip_differs
    # environment tokens carry action mask 0 and are the tokenised feedback
    i = 0
    env_tok = out["response_ids"][i][(out["response_mask"][i] == 0) & (out["turn_ids"][i] == 1)].tolist()
    assert tok.decode(env_tok) == "\nok 1:"


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("sampling", [{"temperature": 1.0}, {"temperature": 0.7, "top_k": 5, "top_p": 0.9}])
def test_behavior_logprobs_equal_a_rescoring_of_the_final_batch(kind, sampling, tok):
    m = _model(kind, len(tok))
    out = _rollout(m, tok, _turn_env(done_at=3), max_turns=3, **sampling)
    lp, _ = response_logprobs(m, out["input_ids"], out["attention_mask"], out["response_ids"],
                              temperature=sampling["temperature"], fused=False)
    mask = out["response_mask"] > 0
    err = (lp - out["behavior_logprobs"]).abs()[mask].max().item()
    assert err <= 1e-5, err
    assert (out["behavior_logprobs"][~mask] == 0).all()


def test_rewards_turns_and_masks_layout(tok):
    m = _model("llama", len(tok))
    out = _rollout(m, tok, _turn_env(), max_turns=3)  # never done: every trajectory runs all 3 turns
    assert out["turns"].tolist() == [3] * 6
    assert out["scores"].tolist() == [6.0] * 6  # 1 + 2 + 3
    for i in range(6):
        for k in (1, 2, 3):
            pos = ((out["turn_ids"][i] == k) & (out["response_mask"][i] > 0)).nonzero().max()
            assert out["rewards"][i, pos] == k  # each turn's reward on its last model token
        assert out["rewards"][i].sum() == 6.0
        # nothing is appended after the last turn: the row ends with a model token
        last = (out["attention_mask"][i, -out["response_mask"].shape[1]:] > 0).nonzero().max()
        assert out["response_mask"][i, last] == 1
        # prompt left-padded, everything after it contiguous then right-padded
        a = out["attention_mask"][i]
        first = a.nonzero().min()
        assert a[first:last + out["input_ids"].shape[1] - out["response_mask"].shape[1] + 1].all()
    stats = multi_turn_stats(out)
    assert stats["turns_mean"] == 3.0 and stats["failed"] == 0.0 and stats["env_tokens_mean"] == 12.0


def test_masked_estimators_equal_the_packed_computation_on_a_real_rollout(tok):
    m = _model("gpt2", len(tok))
    g = 3
    out = _rollout(m, tok, _turn_env(done_at=3), max_turns=3, g=g)
    r, mask = out["rewards"].double(), out["response_mask"] > 0
    assert (~mask & (out["attention_mask"][:, -mask.shape[1]:] > 0)).any()  # there are environment tokens
    values = torch.randn(r.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    adv, ret = gae(r, values, gamma=0.9, lamda=0.8, mask=mask)
    torch.testing.assert_close(adv, ref_gae(r, values, gamma=0.9, lamda=0.8, mask=mask)[0])
    for i in range(r.shape[0]):  # packed: the decision tokens alone, then scattered back
        pa, _ = gae(r[i][mask[i]], values[i][mask[i]], gamma=0.9, lamda=0.8)
        torch.testing.assert_close(adv[i][mask[i]], pa)
        assert (adv[i][~mask[i]] == 0).all()
    grpo = advantages("grpo", rewards=r, mask=mask, group_size=g)["advantages"]
    grpo = grpo.unsqueeze(-1) * mask if grpo.ndim == 1 else grpo
    torch.testing.assert_close(torch.where(mask, grpo, 0.0), ref_grpo(r, g, mask=mask))
    # the batch goes straight into make_experience, turn rewards through extra_inputs
    exp = make_experience(m, out, out["scores"], group_size=g, estimator="grpo",
                          extra_inputs={"rewards": out["rewards"]})
    assert (exp["advantages"][~mask] == 0).all() and exp["advantages"][mask].abs().sum() > 0


def test_a_next_state_that_does_not_extend_starts_a_new_segment(tok):
    m = _model("gpt2", len(tok))
    rec = _Recorder(m)
    out = _rollout(m, tok, _turn_env(extend=False), max_turns=2, n=1, g=2)
    assert out["sample_index"].tolist() == [0, 0, 1, 1] and out["segment_index"].tolist() == [0, 1, 0, 1]
    assert out["turns"].tolist() == [2, 2] and out["scores"].tolist() == [3.0, 3.0]
    p = out["input_ids"].shape[1] - out["response_ids"].shape[1]
    for row, i in ((1, 0), (3, 1)):  # the second segment starts from the fresh state
        start = out["input_ids"][row, :p][out["attention_mask"][row, :p] > 0].tolist()
        assert tok.decode(start) == f"fresh {i}:"
        seen = rec.calls[1]["input_ids"][i][rec.calls[1]["attention_mask"][i] > 0].tolist()
        assert seen == start
    # the first segment has no environment tokens (the state was replaced, not extended)
    assert (out["response_mask"][0][out["attention_mask"][0, p:] > 0] == 1).all()
    lp, _ = response_logprobs(m, out["input_ids"], out["attention_mask"], out["response_ids"], fused=False)
    mask = out["response_mask"] > 0
    assert (lp - out["behavior_logprobs"]).abs()[mask].max() <= 1e-5


def test_a_raising_environment_fails_its_sample_only(tok, caplog):
    def env_step(s):
        if s.index == 1 and s.turn == 2:
            raise RuntimeError("tool server down")
        return {"next_state": s.state_text + s.action_text + "\nmore:", "done": False, "reward": 1.0}

    m = _model("llama", len(tok))
    with caplog.at_level(logging.WARNING, logger="rl2fx.multiturn"):
        out = _rollout(m, tok, env_step, max_turns=3)
    assert out["failed"].tolist() == [0, 1, 0, 0, 0, 0]
    assert out["turns"].tolist() == [3, 2, 3, 3, 3, 3]
    assert (out["response_mask"][1] == 0).all() and (out["rewards"][1] == 0).all() and out["scores"][1] == 0
    assert "environment 'env_step', sample 1, turn 2" in caplog.text and "tool server down" in caplog.text
    assert multi_turn_stats(out)["failed"] == 1.0

    def always(s):
        raise ValueError("broken")

    with pytest.raises(EnvError, match=r"every sample failed \(6 of 6\).*sample 0.*broken"):
        _rollout(m, tok, always)


def test_malformed_env_output_and_bad_arguments_raise(tok):
    m = _model("llama", len(tok))
    with pytest.raises(EnvError, match=r"environment '<lambda>', sample 0: reward must be a finite number"):
        _rollout(m, tok, lambda s: {"next_state": None, "done": True, "reward": float("nan")})
    with pytest.raises(EnvError, match="next_state must be str or None"):
        _rollout(m, tok, lambda s: {"next_state": 5, "done": False, "reward": 0.0})
    with pytest.raises(ValueError, match="max_turns"):
        _rollout(m, tok, _turn_env(), max_turns=0)
    with pytest.raises(ValueError, match="prompt_texts has 1 entries but rows has 2"):
        multi_turn_rollout(m, tok, [{}, {}], _turn_env(), prompt_texts=["a"])
    empty = multi_turn_rollout(m, tok, [], _turn_env(), prompt_texts=[])
    assert empty["input_ids"].shape == (0, 0) and empty["turns"].shape == (0,) and multi_turn_stats(empty) == {}


def test_prompt_ids_and_the_shipped_guess_number_task(tok):
    ds = load_prompts(str(guess_number.DATA))
    assert len(ds) == 36 and set(ds.column_names) == {"prompt", "target", "low", "high"}
    rows = [ds[i] for i in range(2)]
    texts = [r["prompt"] for r in rows]
    enc = tok(texts, padding=True, padding_side="left", return_tensors="pt", add_special_tokens=False)
    m = _model("gpt2", len(tok))
    torch.manual_seed(0)
    out = multi_turn_rollout(m, tok, rows, guess_number.__file__, prompt_texts=texts, prompt_ids=enc["input_ids"],
                             prompt_mask=enc["attention_mask"], responses_per_prompt=2, max_turns=2, max_new_tokens=3)
    p = out["input_ids"].shape[1] - out["response_ids"].shape[1]
    assert tok.decode(out["input_ids"][0, :p][out["attention_mask"][0, :p] > 0]) == texts[0]
    assert set(out["scores"].tolist()) <= {0.0, 1.0} and (out["turns"] <= 2).all()
    env_text = tok.decode(out["response_ids"][0][(out["response_mask"][0] == 0) & (out["turn_ids"][0] == 1)])
    assert out["turns"][0] == 1 or env_text.endswith("\nguess:")


def test_the_docs_page_examples_run(tmp_path, monkeypatch, capsys):
    import re
    from pathlib import Path

    page = Path(__file__).resolve().parents[1] / "docs" / "multiturn.md"
    blocks = re.findall(r"^```python\n(.*?)^```", page.read_text(), re.S | re.M)
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        exec(compile(code, str(page), "exec"), {"__name__": "__docs__"})
    printed = capsys.readouterr().out
    assert "14" in printed and "turns_mean" in printed


def _scripted_gpt2(tok, script: dict[int, str], n_pos: int = 64):
    """A real GPT-2 whose next token depends only on the position: ``script[pos]`` is (almost surely) sampled there.

    Token embeddings and every block's output projections are zero, so the last hidden state is
    LayerNorm(one-hot(position)); the untied LM head scores the scripted token at each position.
    """
    m = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=n_pos, n_layer=1, n_head=2, n_positions=n_pos,
                                   tie_word_embeddings=False, bos_token_id=1, eos_token_id=2))
    with torch.no_grad():
        m.transformer.wte.weight.zero_()
        m.transformer.wpe.weight.copy_(torch.eye(n_pos))
        for block in m.transformer.h:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                proj.weight.zero_()
                proj.bias.zero_()
        m.lm_head.weight.zero_()
        for pos, t in script.items():
            tid = tok.eos_token_id if t == "<eos>" else tok.convert_tokens_to_ids(t)
            m.lm_head.weight[tid, pos - 1] += 50.0  # the hidden state at pos - 1 predicts the token at pos
    return m.eval()


def test_calculator_tool_call_stops_gets_its_result_and_is_scored():
    from rl2fx.tools import calculator

    tok = char_tokenizer("abcdefghijklmnopqrstuvwxyz0123456789 +-=:?.,!\n<>/*()")
    prompt, call, result = "q:", "<calc>2*3</calc>", "<result>6</result>"
    script = {2 + k: c for k, c in enumerate(call)}
    after = 2 + len(call) + len(result)
    script.update({after: "6", after + 1: "<eos>"})
    m = _scripted_gpt2(tok, script)
    torch.manual_seed(0)
    out = multi_turn_rollout(m, tok, [{"answer": 6}], calculator, prompt_texts=[prompt], responses_per_prompt=2,
                             max_turns=3, max_new_tokens=24, stop=["</calc>"])
    assert out["turns"].tolist() == [2, 2] and out["scores"].tolist() == [1.0, 1.0]
    n = len(call) + len(result) + 2
    assert tok.decode(out["response_ids"][0, :n], skip_special_tokens=True) == call + result + "6"
    assert out["response_ids"][0, n - 1] == tok.eos_token_id
    expect_mask = [1.0] * len(call) + [0.0] * len(result) + [1.0, 1.0]
    assert out["response_mask"][0, :n].tolist() == expect_mask and (out["response_mask"][:, n:] == 0).all()
    assert out["rewards"][0].nonzero().flatten().tolist() == [n - 1] and out["rewards"][0, n - 1] == 1.0
    lp, _ = response_logprobs(m, out["input_ids"], out["attention_mask"], out["response_ids"], fused=False)
    mask = out["response_mask"] > 0
    assert (lp - out["behavior_logprobs"]).abs()[mask].max() <= 1e-5
    # without the stop string the first turn runs on past the tool call
    torch.manual_seed(0)
    no_stop = multi_turn_rollout(m, tok, [{"answer": 6}], calculator, prompt_texts=[prompt], max_turns=1,
                                 max_new_tokens=24)
    assert int(no_stop["response_mask"][0].sum()) == 24


def test_stop_strings_end_each_response_at_the_first_match(tok):
    m = _model("llama", len(tok))
    vowels = ["a", "e", "i", "o", "u"]
    out = _rollout(m, tok, _turn_env(), max_turns=2, max_new_tokens=12, stop=vowels)
    stopped = 0
    for i in range(out["turns"].shape[0]):
        for k in (1, 2):
            sel = (out["turn_ids"][i] == k) & (out["response_mask"][i] > 0)
            toks = out["response_ids"][i][sel].tolist()
            before = tok.decode(toks[:-1], skip_special_tokens=True)
            assert not any(v in before for v in vowels)
            full = tok.decode(toks, skip_special_tokens=True)
            if any(v in full for v in vowels):
                stopped += 1
            else:
                assert len(toks) == 12 or toks[-1] == tok.eos_token_id
    assert stopped > 0
    lp, _ = response_logprobs(m, out["input_ids"], out["attention_mask"], out["response_ids"], fused=False)
    mask = out["response_mask"] > 0
    assert (lp - out["behavior_logprobs"]).abs()[mask].max() <= 1e-5
    with pytest.raises(ValueError, match=r"stop\[0\] must be a non-empty string"):
        _rollout(m, tok, _turn_env(), stop=[""])


def test_max_length_ends_trajectories_that_no_longer_fit(tok):
    m = _model("llama", len(tok))
    out = _rollout(m, tok, _turn_env(), max_turns=6, max_new_tokens=4, max_length=24)
    lengths = out["attention_mask"].sum(-1)
    assert (lengths <= 24).all()
    assert out["truncated"].bool().any() and (out["turns"][out["truncated"].bool()] < 6).all()
    t = out["response_mask"].shape[1]
    for i in range(out["turns"].shape[0]):  # no environment text after the last response
        last = (out["attention_mask"][i, -t:] > 0).nonzero().max()
        assert out["response_mask"][i, last] == 1
    assert multi_turn_stats(out)["truncated"] == float(out["truncated"].sum())
    with pytest.raises(ValueError, match="prompt row 1 has 10 tokens"):
        _rollout(m, tok, _turn_env(), max_new_tokens=4, max_length=12)
    with pytest.raises(ValueError, match="max_length"):
        _rollout(m, tok, _turn_env(), max_new_tokens=4, max_length=4)


@pytest.mark.parametrize("skip", [True, False])
def test_action_text_decoding_of_special_tokens(tok, skip):
    seen = []

    def env_step(s):
        seen.append(s.action_text)
        return {"next_state": None, "done": True, "reward": 0.0}

    m = _model("llama", len(tok))
    out = _rollout(m, tok, env_step, max_turns=1, max_new_tokens=30, g=4, skip_special_tokens=skip)
    ended = [i for i in range(len(seen)) if tok.eos_token_id in out["response_ids"][i].tolist()]
    assert ended  # some responses ended with <eos>
    for i in ended:
        assert seen[i].endswith(tok.eos_token) is not skip


def _pack(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each row's masked-in entries moved to the front, in order; zeros after them."""
    out = torch.zeros_like(x)
    for i in range(x.shape[0]):
        v = x[i][mask[i]]
        out[i, : v.shape[0]] = v
    return out


def test_every_registered_estimator_is_masked_equals_packed_on_a_real_rollout(tok):
    from rl2fx.returns import get_estimator, list_estimators

    m = _model("gpt2", len(tok))
    g = 3
    out = _rollout(m, tok, _turn_env(done_at=3), max_turns=3, g=g, n=2)
    mask = out["response_mask"] > 0
    r = out["rewards"].double()
    gen = torch.Generator().manual_seed(0)
    per_token = {"rewards": r, "values": torch.randn(r.shape, generator=gen, dtype=torch.float64),
                 "log_rhos": 0.1 * torch.randn(r.shape, generator=gen, dtype=torch.float64),
                 "old_logprobs": out["behavior_logprobs"].double(),
                 "sum_pi_squared": torch.rand(r.shape, generator=gen, dtype=torch.float64)}
    per_row = {"group_size": g, "greedy_rewards": torch.tensor([0.5, 1.5], dtype=torch.float64),
               "reward_components": torch.stack([out["scores"], out["turns"].float()], -1).double()}
    packed_mask = _pack(mask, mask)
    assert packed_mask.sum() == mask.sum() and not torch.equal(packed_mask, mask)  # packing moves tokens
    for name in list_estimators():
        spec = get_estimator(name)
        kw = {k: v for k, v in per_row.items() if k in spec.accepts}
        a = advantages(name, mask=mask, **kw, **{k: v for k, v in per_token.items() if k in spec.accepts})
        b = advantages(name, mask=packed_mask, **kw,
                       **{k: _pack(v, mask) for k, v in per_token.items() if k in spec.accepts})
        for key in ("advantages", "returns"):
            x, y = a[key], b[key]
            if x.ndim == 1:  # one value per sequence
                torch.testing.assert_close(x, y, msg=f"{name} {key}")
                continue
            assert torch.isfinite(x).all(), name
            assert (x[~mask] == 0).all(), f"{name} {key}: non-zero on environment tokens or padding"
            torch.testing.assert_close(x[mask], y[packed_mask], msg=f"{name} {key}")


def test_estimators_run_per_trajectory_across_segments(tok):
    m = _model("gpt2", len(tok))
    g = 2

    def env_step(s):  # a fresh state after turn 1; rewards that differ between trajectories
        nxt = f"fresh {s.index}:" if s.turn == 1 else s.state_text + s.action_text + "\nok:"
        return {"next_state": nxt, "done": False, "reward": float(sum(map(ord, s.action_text)) % 3)}

    out = _rollout(m, tok, env_step, max_turns=3, n=2, g=g)
    assert out["response_mask"].shape[0] == 2 * out["turns"].shape[0]  # every trajectory has two segments
    assert out["scores"].unique().numel() > 1
    for key in ("rewards", "response_mask", "response_ids", "behavior_logprobs"):
        assert torch.equal(from_trajectories(to_trajectories(out[key], out), out), out[key])
    mask_r = out["response_mask"] > 0
    r, mask = to_trajectories(out["rewards"].double(), out), to_trajectories(out["response_mask"], out) > 0
    assert torch.equal(r.sum(-1), out["scores"].double())
    values = torch.randn(r.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    adv, _ = gae(r, values, gamma=0.9, lamda=0.8, mask=mask)
    for i in range(r.shape[0]):  # one decision sequence per trajectory: its segments' model tokens in order
        rows = (out["sample_index"] == i).nonzero().flatten()
        toks = torch.cat([out["rewards"][k][mask_r[k]] for k in rows]).double()
        vals = torch.cat([from_trajectories(values, out)[k][mask_r[k]] for k in rows])
        torch.testing.assert_close(adv[i][mask[i]], ref_gae(toks, vals, gamma=0.9, lamda=0.8)[0])
    grpo = advantages("grpo", rewards=r, mask=mask, group_size=g)["advantages"]
    expect = ref_grpo(out["scores"].double().unsqueeze(-1), g)[:, 0]
    torch.testing.assert_close(torch.where(mask, grpo, 0.0), torch.where(mask, expect.unsqueeze(-1), 0.0))
    per_row = from_trajectories(torch.where(mask, adv, 0.0), out)
    assert per_row.shape == out["rewards"].shape and (per_row[~mask_r] == 0).all()
