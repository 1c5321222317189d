"""The open PPOTrainer: the user's model, prompts, reward functions, LoRA, eval tables and callbacks."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from rl2fx import load_config
from rl2fx.prompts import PromptDataError
from rl2fx.rewards import RewardFunctionError
from rl2fx.testing.tokenizers import char_tokenizer
from rl2fx.trainer.config import ConfigError
from rl2fx.trainer.ppo import PPOTrainer

CHAT = ("{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}a:{% endif %}")


def tiny_model(tok, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=64,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=tok.pad_token_id,
                                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id))


def count_sevens(prompts, completions, **kw):
    return [c.count("7") / 4.0 for c in completions]


def short(prompts, completions, **kw):
    return [1.0 - min(len(c), 4) / 4.0 for c in completions]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rows(n: int = 12) -> list[dict]:
    return [{"prompt": "7" * (1 + i % 5) + "=", "answer": str(i)} for i in range(n)]


def config(tmp_path: Path, *overrides: str):
    return load_config("demo", overrides=[
        f"trainer.output_dir={tmp_path / 'run'}", "trainer.total_steps=2", "trainer.progress_bar=false",
        "data.prompts_per_rollout=2", "data.responses_per_prompt=4", "rollout.max_new_tokens=4",
        "adv.estimator=grpo", "experiment_tracking.enable_wandb=false", "memory_optimization.enabled=false",
        "actor.lr=1e-2", *overrides])


def test_jsonl_dataset_with_two_weighted_reward_functions(tmp_path):
    tok = char_tokenizer()
    data = write_jsonl(tmp_path / "train.jsonl", rows())
    seen: dict[str, list] = {}

    def with_columns(prompts, completions, answer, **kw):
        seen.setdefault("answer", []).extend(answer)
        seen.setdefault("prompts", []).extend(prompts)
        return [0.5] * len(completions)

    cfg = config(tmp_path, "experiment_tracking.enabled=false")
    trainer = PPOTrainer(cfg, model=tiny_model(tok), tokenizer=tok, reward_funcs=[count_sevens, short, with_columns],
                         reward_weights=[2.0, 0.5, 1.0], train_dataset=str(data))
    exp = trainer.make_experience()
    s = trainer.source  # the scores of this rollout, recomputed from the decoded completions
    comps = tok.batch_decode(torch.where(exp["response_mask"] > 0, exp["response_ids"], 0), skip_special_tokens=True)
    expected = torch.tensor([2.0 * c.count("7") / 4 + 0.5 * (1 - min(len(c), 4) / 4) + 0.5 for c in comps])
    torch.testing.assert_close(exp["scores"], expected)
    m = trainer._reward_metrics
    assert m["rewards/count_sevens/mean"] == pytest.approx(float(torch.tensor(
        [c.count("7") / 4 for c in comps]).mean()), abs=1e-6)
    assert m["rewards/with_columns/skipped"] == 0.0
    # every other column reaches the functions, repeated for each of a prompt's responses
    assert len(seen["answer"]) == 8 and seen["answer"][0::4] == seen["answer"][0::4]
    assert all(seen["answer"][i] == seen["answer"][4 * (i // 4)] for i in range(8))
    assert s.reward_names == ("count_sevens", "short", "with_columns")


def test_none_rewards_are_skipped_and_counted(tmp_path):
    tok = char_tokenizer()

    def half(prompts, completions, **kw):
        return [None if i % 2 else 1.0 for i in range(len(completions))]

    trainer = PPOTrainer(config(tmp_path, "experiment_tracking.enabled=false"), model=tiny_model(tok), tokenizer=tok,
                         reward_funcs=[half, short], train_dataset=rows())
    metrics = trainer.train_iteration()
    assert metrics["rewards/half/skipped"] == 4.0 and metrics["rewards/half/mean"] == 1.0
    assert metrics["rewards/short/skipped"] == 0.0


def test_chat_message_dataset_is_rendered_with_the_chat_template(tmp_path):
    tok = char_tokenizer(chat_template=CHAT)
    data = [{"prompt": [{"role": "user", "content": "7" * (1 + i % 3)}]} for i in range(6)]
    got: list = []

    def record(prompts, completions, **kw):
        got.extend(prompts)
        return [0.0] * len(completions)

    trainer = PPOTrainer(config(tmp_path, "experiment_tracking.enabled=false"), model=tiny_model(tok), tokenizer=tok,
                         reward_funcs=record, train_dataset=data)
    p = trainer.source.sample()
    assert p.texts[0].startswith("u:7") and p.texts[0].endswith("a:")
    trainer.train_iteration()
    assert isinstance(got[0], list) and got[0][0]["role"] == "user"  # functions get the messages, as in TRL
    # left padding: every prompt's last token is the generation prompt's last character
    assert (trainer.source.sample().input_ids[:, -1] == tok.convert_tokens_to_ids(":")).all()


def test_chat_dataset_without_chat_template_is_one_clear_error(tmp_path):
    tok = char_tokenizer()
    data = [{"prompt": [{"role": "user", "content": "7"}]}] * 4
    trainer = PPOTrainer(config(tmp_path, "experiment_tracking.enabled=false"), model=tiny_model(tok), tokenizer=tok,
                         reward_funcs=short, train_dataset=data)
    with pytest.raises(PromptDataError, match="chat_template"):
        trainer.train_iteration()


def test_lora_trains_only_the_adapters_and_saves_them(tmp_path):
    peft = pytest.importorskip("peft")
    tok = char_tokenizer()
    model = tiny_model(tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = config(tmp_path, "experiment_tracking.enabled=false", "trainer.merge_adapters=true",
                 "memory_optimization.enabled=true", "trainer.log_kl=true")
    trainer = PPOTrainer(cfg, model=model, tokenizer=tok, reward_funcs=count_sevens, train_dataset=rows(),
                         peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"]))
    assert trainer.ref_model is None  # the reference is the adapter-disabled base: no copy
    result = trainer.train()
    changed_lora = changed_base = 0
    for name, p in trainer.policy.named_parameters():
        base_name = name.replace("base_model.model.", "").replace(".base_layer", "")
        if "lora_" in name:
            changed_lora += int(not torch.equal(p, torch.zeros_like(p)) and p.requires_grad)
        elif base_name in before:
            changed_base += int(not torch.equal(p.detach(), before[base_name]))
    assert changed_lora > 0 and changed_base == 0
    lora_b = [p for n, p in trainer.policy.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # B starts at 0: it moved
    final = Path(result["final_model"])
    assert (final / "adapter_model.safetensors").exists() and (final / "adapter_config.json").exists()
    assert not (final / "model.safetensors").exists()
    merged = GPT2LMHeadModel.from_pretrained(tmp_path / "run" / "final_model_merged")
    x = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():  # the merged plain model computes what the trained adapters do
        torch.testing.assert_close(merged(x).logits, trainer.policy.eval()(input_ids=x).logits, rtol=0, atol=1e-5)
    assert math.isfinite(result["kl"])


def test_eval_table_read_back_from_mlflow_and_callbacks(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    tok = char_tokenizer()
    events: list[tuple] = []

    class Recorder:
        def on_train_begin(self, trainer):
            events.append(("begin", trainer.step))

        def on_step_end(self, trainer, metrics):
            events.append(("step", trainer.step, "reward" in metrics))

        def on_evaluate(self, trainer, metrics):
            events.append(("eval", trainer.step, metrics["eval/reward"]))

        def on_save(self, trainer, path):
            events.append(("save", Path(path).name))

        def on_train_end(self, trainer, result):
            events.append(("end", result["steps"]))

    cfg = config(tmp_path, "trainer.eval_interval=1", "experiment_tracking.log_models=false")
    trainer = PPOTrainer(cfg, model=tiny_model(tok), tokenizer=tok, reward_funcs=[count_sevens, short],
                         train_dataset=rows(), eval_dataset=rows(3), callbacks=[Recorder()])
    result = trainer.train()
    assert [e[0] for e in events] == ["begin", "step", "eval", "step", "eval", "save", "end"]
    client = mlflow.MlflowClient(result["mlflow_tracking_uri"])
    mlflow.set_tracking_uri(result["mlflow_tracking_uri"])
    mlflow.set_experiment(experiment_id=client.get_run(result["mlflow_run_id"]).info.experiment_id)
    df = mlflow.load_table("eval/step-000002.json", run_ids=[result["mlflow_run_id"]])
    assert len(df) == 3 and {"prompt", "completion", "reward", "reward/count_sevens", "reward/short"} <= set(df)
    assert df["prompt"].tolist() == [r["prompt"] for r in rows(3)]
    # the MLflow store, its artifacts and the eval tables are under trainer.output_dir
    assert Path(result["mlflow_tracking_uri"][len("sqlite:///"):]).resolve().is_relative_to((tmp_path / "run").resolve())
    local = [json.loads(x) for x in (tmp_path / "run" / "eval" / "step-000002.jsonl").read_text().splitlines()]
    assert [r["completion"] for r in local] == df["completion"].tolist()
    assert events[2][2] == pytest.approx(float(df_mean(local)), abs=1e-6) or events[4][2] == pytest.approx(
        float(df_mean(local)), abs=1e-6)


def df_mean(rows_: list[dict]) -> float:
    return sum(r["reward"] for r in rows_) / len(rows_)


def test_no_reference_and_no_old_pass_without_kl(tmp_path):
    """TRL's defaults (one update, no KL term, nothing logged): neither extra forward pass runs."""
    tok = char_tokenizer()
    model = tiny_model(tok)
    cfg = config(tmp_path, "experiment_tracking.enabled=false", "actor.kl.adaptive_kl.enabled=false",
                 "actor.kl.coef=0.0", "trainer.log_kl=false")
    trainer = PPOTrainer(cfg, model=model, tokenizer=tok, reward_funcs=short, train_dataset=rows())
    assert trainer.ref_model is None and not trainer.needs.old and not trainer.needs.ref
    calls = []
    h = model.register_forward_hook(lambda *a: calls.append(1))
    metrics = trainer.train_iteration()
    h.remove()
    assert "rollout_kl" not in metrics
    # generate: one call per new token (at most 4); the loss: one; nothing else
    assert len(calls) <= 4 + 1


@pytest.mark.parametrize(("funcs", "match", "exc"), [
    (lambda prompts, completions, **k: [1.0], r"returned 1 scores, expected one per completion \(8\)", RewardFunctionError),
    (lambda prompts, completions, **k: [float("nan")] * len(completions), "returned nan at index 0", RewardFunctionError),
])
def test_bad_reward_function_is_one_clear_error(tmp_path, funcs, match, exc):
    tok = char_tokenizer()
    trainer = PPOTrainer(config(tmp_path, "experiment_tracking.enabled=false"), model=tiny_model(tok), tokenizer=tok,
                         reward_funcs=funcs, train_dataset=rows())
    with pytest.raises(exc, match=match):
        trainer.train_iteration()


def test_reward_function_that_raises_is_named(tmp_path):
    tok = char_tokenizer()

    def broken(prompts, completions, **kw):
        raise KeyError("answer")

    trainer = PPOTrainer(config(tmp_path, "experiment_tracking.enabled=false"), model=tiny_model(tok), tokenizer=tok,
                         reward_funcs=broken, train_dataset=rows())
    with pytest.raises(RewardFunctionError, match="broken"):
        trainer.train_iteration()


def test_bad_setup_errors_name_the_argument(tmp_path):
    tok = char_tokenizer()
    cfg = config(tmp_path, "experiment_tracking.enabled=false")
    with pytest.raises(PromptDataError, match="question"):
        PPOTrainer(cfg, model=tiny_model(tok), tokenizer=tok, reward_funcs=short,
                   train_dataset=[{"question": "7="}] * 3)
    with pytest.raises(ConfigError, match="pad_token"):
        PPOTrainer(cfg, model=tiny_model(tok), tokenizer=char_tokenizer(pad=False), reward_funcs=short,
                   train_dataset=rows())
    with pytest.raises(ConfigError, match="without reward functions"):
        PPOTrainer(cfg, model=tiny_model(tok), tokenizer=tok, train_dataset=rows())
    with pytest.raises(ConfigError, match="without prompts"):
        PPOTrainer(cfg, model=tiny_model(tok), tokenizer=tok, reward_funcs=short)
    with pytest.raises(ConfigError, match="tokenizer is required"):
        PPOTrainer(cfg, model=tiny_model(tok), reward_funcs=short, train_dataset=rows())
    with pytest.raises(ConfigError, match="'task.reward_level' 'token' is a setting of the built-in digits task"):
        PPOTrainer(config(tmp_path, "experiment_tracking.enabled=false", "task.reward_level=token"),
                   model=tiny_model(tok), tokenizer=tok, reward_funcs=short, train_dataset=rows())
    with pytest.raises(ConfigError, match=r"reward_funcs\[1\] is a str"):
        PPOTrainer(cfg, model=tiny_model(tok), tokenizer=tok, reward_funcs=[short, "short"], train_dataset=rows())
    with pytest.raises(ConfigError, match="peft_config must be a peft.PeftConfig"):
        PPOTrainer(cfg, model=tiny_model(tok), tokenizer=tok, reward_funcs=short, train_dataset=rows(),
                   peft_config={"r": 8})
    with pytest.raises(ConfigError, match=r"callbacks\[0\] \(int\) has none of the hooks"):
        PPOTrainer(cfg, model=tiny_model(tok), tokenizer=tok, reward_funcs=short, train_dataset=rows(), callbacks=[3])
    with pytest.raises(ConfigError, match="digits task"):
        PPOTrainer(cfg, model=tiny_model(tok), tokenizer=tok)


def test_missing_model_is_one_line_at_once(tmp_path):
    cfg = config(tmp_path, "experiment_tracking.enabled=false")
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        PPOTrainer(cfg, model="some-org/not-downloaded-model", reward_funcs=short, train_dataset=rows())
    assert time.perf_counter() - t0 < 10  # no network retries (transformers alone retries for ~25 s)
    msg = str(e.value)
    assert "\n" not in msg and "'some-org/not-downloaded-model'" in msg and "local_files_only" in msg
    with pytest.raises(ConfigError, match="no such directory"):
        PPOTrainer(cfg, model=str(tmp_path / "nope"), reward_funcs=short, train_dataset=rows())


def test_model_and_tokenizer_from_a_directory_and_resume(tmp_path):
    tok = char_tokenizer()
    d = tmp_path / "my-model"
    tiny_model(tok).save_pretrained(d)
    tok.save_pretrained(d)
    data = write_jsonl(tmp_path / "p.jsonl", rows())
    common = ("experiment_tracking.enabled=false", f"data.train_data_path={data}", f"actor.model_name={d}")
    full = PPOTrainer(config(tmp_path / "a", *common, "trainer.total_steps=4"), reward_funcs=short)
    r_full = full.train()
    half = PPOTrainer(config(tmp_path / "b", *common), reward_funcs=short)
    half.train()
    resumed = PPOTrainer(config(tmp_path / "b", *common, "trainer.total_steps=4", "trainer.resume_from=auto"),
                         reward_funcs=short)
    r_res = resumed.train()
    assert full.history["reward"] == resumed.history["reward"]  # same prompts, same samples after resume
    assert r_full["reward_end"] == r_res["reward_end"]


def test_dynamic_sampling_drops_all_equal_groups_and_refills(tmp_path):
    tok = char_tokenizer()
    calls = {"n": 0}

    def alternating(prompts, completions, answer, **kw):
        # the first rollout's groups all score 1 (no signal); later rollouts vary within each group
        calls["n"] += 1
        if calls["n"] == 1:
            return [1.0] * len(completions)
        return [float(i % 2) for i in range(len(completions))]

    cfg = config(tmp_path, "experiment_tracking.enabled=false", "trainer.dynamic_sampling=true",
                 "trainer.dynamic_sampling_max_rollouts=3")
    trainer = PPOTrainer(cfg, model=tiny_model(tok), tokenizer=tok, reward_funcs=alternating, train_dataset=rows())
    m = trainer.train_iteration()
    assert m["dynamic_sampling/rollouts"] == 2.0 and m["dynamic_sampling/dropped_groups"] == 2.0
    assert m["dynamic_sampling/filled_groups"] == 0.0
    assert m["reward"] == pytest.approx((8 * 1.0 + 4.0) / 16)  # every sampled response
    assert m["reward_trained"] == pytest.approx(0.5)  # the kept groups only
    # never more than the cap: with no varied group at all, the batch is completed with dropped groups
    calls["n"] = -100

    def constant(prompts, completions, **kw):
        return [0.0] * len(completions)

    trainer = PPOTrainer(cfg, model=tiny_model(tok), tokenizer=tok, reward_funcs=constant, train_dataset=rows())
    m = trainer.train_iteration()
    assert m["dynamic_sampling/rollouts"] == 3.0 and m["dynamic_sampling/filled_groups"] == 2.0
    assert m["dynamic_sampling/dropped_groups"] == 6.0


def test_overlong_penalty_from_the_config(tmp_path):
    tok = char_tokenizer()

    def zero(prompts, completions, **kw):
        return [0.0] * len(completions)

    cfg = config(tmp_path, "experiment_tracking.enabled=false", "trainer.overlong_buffer_len=2",
                 "trainer.overlong_penalty_factor=0.5")
    trainer = PPOTrainer(cfg, model=tiny_model(tok), tokenizer=tok, reward_funcs=zero, train_dataset=rows())
    exp = trainer.make_experience()
    lengths = exp["response_mask"].sum(1)  # max_new_tokens = 4, the penalty ramps over lengths 3..4
    expected = 0.5 * torch.where(lengths <= 2, 0.0, (2 - lengths) / 2)
    torch.testing.assert_close(exp["scores"], expected)
    assert (expected < 0).any()  # (seeded: some responses reach the buffer)
    with pytest.raises(ConfigError, match="trainer.overlong_buffer_len"):
        PPOTrainer(config(tmp_path, "trainer.overlong_buffer_len=9"), model=tiny_model(tok), tokenizer=tok,
                   reward_funcs=zero, train_dataset=rows())
