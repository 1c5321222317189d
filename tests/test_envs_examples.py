"""The shipped multi-turn task ``higher_lower``: its data, tokenizer, game rules and a rollout with its tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from rl2fx.envs import EnvSample, load_env
from rl2fx.envs_examples import higher_lower as hl
from rl2fx.multiturn import multi_turn_rollout


def play(policy, target: int) -> tuple[bool, int]:
    """Play one game through ``env_step`` with ``policy(feedback so far) -> guess text``; (won, turns)."""
    row = {"prompt": hl.PROMPT, "target": target, "low": hl.LOW, "high": hl.HIGH}
    state, feedback = row["prompt"], []
    for turn in range(1, hl.MAX_TURNS + 1):
        guess = policy(feedback)
        out = hl.env_step(EnvSample(sample=row, state_text=state, action_text=guess, turn=turn))
        if out["done"]:
            return out["reward"] == 1.0, turn
        assert out["reward"] == 0.0 and out["next_state"].startswith(state + guess)
        state = out["next_state"]
        feedback.append(state.split()[-2])  # the word before the closing "guess:"
    return False, hl.MAX_TURNS


def test_shipped_data_is_make_rows_and_balanced():
    rows = [json.loads(line) for line in hl.DATA.read_text().splitlines()]
    assert rows == hl.make_rows(len(rows), seed=0)
    counts = {t: sum(r["target"] == t for r in rows) for t in range(hl.LOW, hl.HIGH + 1)}
    assert set(counts.values()) == {len(rows) // 4}
    with pytest.raises(ValueError, match=r"^n must be in \[1, inf\], got 0"):
        hl.make_rows(0)


def test_every_text_of_the_game_is_in_the_vocabulary():
    tok = hl.build_tokenizer()
    unk = tok.unk_token_id
    for text in (hl.PROMPT, " higher\nguess:", " lower\nguess:", " a number\nguess:"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids and unk not in ids, text
    for d in range(hl.LOW, hl.HIGH + 1):  # each digit is one token that decodes back to itself
        (i,) = tok(str(d), add_special_tokens=False)["input_ids"]
        assert tok.decode([i]) == str(d)


def test_feedback_is_worth_reading():
    def bisect(feedback):  # 2; lower -> 1; higher -> 3, higher -> 4
        return {(): "2", ("lower",): "1", ("higher",): "3", ("higher", "higher"): "4"}[tuple(feedback)]

    games = [play(bisect, t) for t in range(hl.LOW, hl.HIGH + 1)]
    assert all(won for won, _ in games) and sum(turns for _, turns in games) == 8  # 2 turns a game on average
    # without the feedback: three distinct guesses win 3 of 4 games, the same digit every turn 1 of 4
    assert sum(play(lambda f: "123"[len(f)], t)[0] for t in range(hl.LOW, hl.HIGH + 1)) == 3
    assert sum(play(lambda f: "3", t)[0] for t in range(hl.LOW, hl.HIGH + 1)) == 1
    assert not any(play(lambda f: "guess", t)[0] for t in range(hl.LOW, hl.HIGH + 1))


def test_rollout_with_the_tiny_model_keeps_the_environment_tokens_out_of_the_mask():
    tok = hl.build_tokenizer()
    model = hl.build_model(tok, seed=0)
    rows = hl.make_rows(4, seed=0)
    torch.manual_seed(0)
    out = multi_turn_rollout(model, tok, rows, load_env(hl.__file__), prompt_texts=[r["prompt"] for r in rows],
                             responses_per_prompt=4, max_turns=hl.MAX_TURNS, max_new_tokens=1, add_special_tokens=True)
    mask, ids = out["response_mask"], out["response_ids"]
    assert out["response_mask"].shape[0] == 16  # one row per game: no segment breaks
    assert torch.equal(mask.sum(1).long(), out["turns"])  # one model token per turn
    assert ((out["turns"] >= 1) & (out["turns"] <= hl.MAX_TURNS)).all()
    env_ids = ids[(mask == 0) & (ids != tok.pad_token_id)]
    assert env_ids.numel() > 0 and tok.unk_token_id not in env_ids.tolist()
    words = {tok.convert_ids_to_tokens(int(i)) for i in env_ids}
    assert words <= {"higher", "lower", "guess:", "a", "number"}
    # a game's score is the sum of its turn rewards, which sit on model tokens only
    assert (out["rewards"][mask == 0] == 0).all()
    assert torch.equal(out["rewards"].sum(1), out["scores"].float())
    assert set(out["scores"].tolist()) <= {0.0, 1.0}


def test_build_model_checks_its_sizes():
    tok = hl.build_tokenizer()
    with pytest.raises(ValueError, match="n_embd"):
        hl.build_model(tok, n_embd=30, n_head=4)
    with pytest.raises(ValueError, match=r"^n_layer must be in"):
        hl.build_model(tok, n_layer=0)
