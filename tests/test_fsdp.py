"""Sharded training (FSDP2), DDP and distributed checkpoints: 2 gloo processes under torchrun.

The single-process reference runs in the test process; the 2-process runs in
``tests/_fsdp_worker.py``. Both take PPO steps (``make_ppo_loss``, 2 micro-batches,
clipping at 1.0) on the same global batch, whose two halves hold different token counts,
so the global token normalisation is exercised.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _dist_helpers import torchrun
from _fsdp_worker import (
    LR,
    ROWS,
    STEPS,
    VOCAB,
    global_batch,
    single_process,
    step,
    tiny_llama,
    whitened_batch,
)

from rl2fx.distributed import (
    STRATEGIES,
    find_block_class,
    load_sharded,
    save_consolidated,
    save_sharded,
    wrap_policy,
)

pytest.importorskip("transformers")

WORKER = "tests/_fsdp_worker.py"


@pytest.fixture(scope="module")
def reference():
    return single_process()


def _worst(params: dict[str, torch.Tensor], ref: list[torch.Tensor]) -> float:
    names = [n for n, _ in tiny_llama().named_parameters()]
    assert sorted(params) == sorted(names)
    return max((params[n] - p).abs().max().item() for n, p in zip(names, ref, strict=True))


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_two_process_update_equals_single_process(strategy, tmp_path, reference):
    ref, ref_metrics = reference
    out = tmp_path / "update.pt"
    proc = torchrun(WORKER, "update", strategy, str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = torch.load(out)
    init = dict(tiny_llama().named_parameters())
    assert _worst({n: p.detach() for n, p in init.items()}, ref) > 1e-3  # the update did something
    worst = _worst(got["params"], ref)
    assert worst <= 1e-5, f"max |{strategy} - single| = {worst}"
    # the first step is clipped (global norm > 1), and the norm is the one over all shards
    assert ref_metrics[0]["grad_norm"] > 1.0
    for mine, theirs in zip(got["metrics"], ref_metrics, strict=True):
        assert mine.keys() == theirs.keys()
        for k in theirs:
            assert mine[k] == pytest.approx(theirs[k], rel=1e-5, abs=1e-6), k
    assert "strategy='single' runs in one process, but this run has 2 processes" in got["single_error"]
    assert "train_step under torch.distributed (2 processes) needs a data-parallel model" in got["bare_error"]
    assert got["generated"] == (ROWS // 2, 4 + 3)
    if strategy == "fsdp":
        assert "every rank must run the same number of micro-batches; they range from 1 to 2" in got["uneven_error"]
        # one reduce-scatter per sharded group (2 blocks + the root) per step: the first
        # micro-batch's backward accumulated locally, only the last one synced
        assert got["reduce_scatters"] == 3 * STEPS


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _same(a, b) -> bool:
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_two_process_checkpoint_resumes_in_two_and_one_process(tmp_path):
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    proc = torchrun(WORKER, "checkpoint", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs, full = torch.load(tmp_path / "runs.pt"), torch.load(tmp_path / "full.pt")
    # 2 processes -> 2 processes: the next step is bit-identical to the uninterrupted run
    assert runs["uninterrupted"].keys() == runs["resumed"].keys()
    for k, v in runs["uninterrupted"].items():
        assert torch.equal(v, runs["resumed"][k]), k
    assert runs["extra"]["step"] == 1 and torch.equal(runs["extra"]["kl_coef"], torch.tensor(0.125))

    # 2 processes -> 1 process (resharded): parameters and Adam state exactly as saved ...
    model = wrap_policy(tiny_llama(seed=7), "single", device="cpu")
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    extra = load_sharded(tmp_path / "ckpt", model, opt)
    assert extra["step"] == 1
    msd, osd = get_state_dict(model, opt)
    for k, v in full["model"].items():
        assert torch.equal(msd[k], v), k
    loaded, saved = _flat(osd), _flat(full["optim"])
    assert loaded.keys() == saved.keys()
    for k in saved:
        assert _same(loaded[k], saved[k]), k
    # ... so its next step is bit-identical to one process continuing from the saved full state
    twin = tiny_llama(seed=3)
    twin_opt = torch.optim.Adam(twin.parameters(), lr=LR)
    set_state_dict(twin, twin_opt, model_state_dict=copy.deepcopy(full["model"]),
                   optim_state_dict=copy.deepcopy(full["optim"]))
    batch = global_batch()
    step(model, opt, batch, 1, ROWS // 2)
    step(twin, twin_opt, batch, 1, ROWS // 2)
    for (n, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q), n
    # and agrees with the uninterrupted 2-process run to rounding (sums are split differently)
    worst = max((p - runs["uninterrupted"][n]).abs().max().item() for n, p in model.named_parameters())
    assert worst <= 1e-5, worst


def test_a_failing_rank_ends_every_rank_with_its_error():
    # rank 0 waits for rank 1 in an all-gather; rank 1 raises: the run exits (the subprocess
    # timeout guards against a hang) and the failing rank's error is in the output
    proc = torchrun(WORKER, "fail", timeout=180)
    assert proc.returncode != 0
    assert "ValueError: rank 1 fails on purpose" in proc.stderr


# --------------------------------------------------------------------------- one process, world 1
@pytest.fixture
def world_of_one(tmp_path):
    """A 1-process gloo group in the test process (FSDP2 on a mesh of one: the degenerate case)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_fsdp_world_of_one_with_activation_checkpointing_equals_single(world_of_one, monkeypatch):
    ref, _ = single_process(steps=1)
    batch = whitened_batch()
    model = wrap_policy(tiny_llama(), "fsdp", device="cpu", activation_checkpointing=True)
    assert sum(type(m).__name__ == "FSDPLlamaDecoderLayer" for m in model.modules()) == 2
    mlp_cls = type(model.model.layers[0].mlp)
    forward, calls = mlp_cls.forward, []

    def counted(self, *args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(mlp_cls, "forward", counted)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    step(model, opt, batch, 0, ROWS // 2)
    # 2 micro-batches x 2 blocks, each block run again in the backward pass (recomputed)
    assert len(calls) == 8 and all(calls)
    from torch.distributed.tensor import DTensor

    got = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach() for n, p in model.named_parameters()}
    assert _worst(got, ref) <= 1e-6


def test_no_grad_log_probs_leave_the_sharded_model_resharded(world_of_one):
    from torch.distributed.tensor import DTensor

    from rl2fx.step import compute_logprobs

    model = wrap_policy(tiny_llama(), "fsdp", device="cpu")
    batch = global_batch()
    with torch.no_grad():
        model(batch["input_ids"])  # a bare forward keeps the root's parameters gathered (a backward would free them)
    assert {n for n, p in model.named_parameters() if not isinstance(p, DTensor)} == {
        "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    model.reshard()
    with torch.no_grad():
        lp, _ = compute_logprobs(model, batch)  # a reference / old log-prob pass
    assert all(isinstance(p, DTensor) for p in model.parameters())
    with torch.no_grad():
        want, _ = compute_logprobs(tiny_llama(), batch)
    assert torch.allclose(lp, want, atol=1e-6)


def test_critic_under_fsdp_equals_single(world_of_one):
    from torch.distributed.tensor import DTensor

    from rl2fx.step import make_value_loss, train_step
    from rl2fx.trainer.tasks.model import build_tiny_critic

    def update(strategy):
        critic = wrap_policy(build_tiny_critic(VOCAB, hidden_size=32, num_layers=2, num_heads=2, seed=0), strategy,
                             device="cpu")
        opt = torch.optim.Adam(critic.parameters(), lr=LR)
        b = global_batch()
        g = torch.Generator().manual_seed(4)
        b["old_values"] = torch.randn(b["response_mask"].shape, generator=g)
        b["returns"] = torch.randn(b["response_mask"].shape, generator=g)
        train_step(critic, opt, b, loss_fn=make_value_loss(), micro_batch_size=ROWS // 2, max_grad_norm=1.0)
        return {n: p.full_tensor() if isinstance(p, DTensor) else p.detach() for n, p in critic.named_parameters()}

    single, sharded = update("single"), update("fsdp")
    assert single.keys() == sharded.keys()
    assert max((single[n] - sharded[n]).abs().max().item() for n in single) <= 1e-6


def test_ddp_checkpoint_loads_into_fsdp(world_of_one, tmp_path):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    ddp = wrap_policy(tiny_llama(), "ddp", device="cpu")
    opt = torch.optim.Adam(ddp.parameters(), lr=LR)
    step(ddp, opt, whitened_batch(), 0, ROWS // 2)
    save_sharded(tmp_path / "ckpt", ddp, opt)
    want = copy.deepcopy(get_state_dict(ddp, opt, options=full))
    fsdp = wrap_policy(tiny_llama(seed=7), "fsdp", device="cpu")
    fsdp_opt = torch.optim.Adam(fsdp.parameters(), lr=LR)
    load_sharded(tmp_path / "ckpt", fsdp, fsdp_opt)
    got = get_state_dict(fsdp, fsdp_opt, options=full)
    for mine, theirs in zip(got, want, strict=True):
        a, b = _flat(mine), _flat(theirs)
        assert a.keys() == b.keys()
        for k in b:
            assert _same(a[k], b[k]), k


def test_save_consolidated_loads_with_from_pretrained(world_of_one, tmp_path):
    from transformers import AutoModelForCausalLM

    model = wrap_policy(tiny_llama(), "fsdp", device="cpu")
    out = save_consolidated(model, None, tmp_path / "hf")
    back = AutoModelForCausalLM.from_pretrained(out)
    assert type(back).__name__ == "LlamaForCausalLM"
    want = dict(tiny_llama().named_parameters())
    for n, p in back.named_parameters():
        assert torch.equal(p, want[n]), n


# --------------------------------------------------------------------------- errors
def test_unknown_strategy_names_the_allowed():
    with pytest.raises(ValueError, match=r"strategy must be one of \['single', 'ddp', 'fsdp'\], got 'zero3'"):
        wrap_policy(tiny_llama(), "zero3")
    assert STRATEGIES == ("single", "ddp", "fsdp")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_parallel_strategy_without_torch_distributed(strategy):
    with pytest.raises(ValueError, match=rf"strategy='{strategy}' needs torch.distributed initialised"):
        wrap_policy(tiny_llama(), strategy)


def test_model_without_blocks_names_the_override():
    with pytest.raises(ValueError, match=r"found no decoder block in Sequential.*trainer\.fsdp_wrap"):
        find_block_class(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()))
    with pytest.raises(ValueError, match=r"trainer.fsdp_wrap \(wrap_cls\) = 'Block' names no module class"):
        find_block_class(tiny_llama(), "Block")
    assert find_block_class(torch.nn.Sequential(torch.nn.Linear(2, 2)), "Linear") is torch.nn.Linear


def test_fsdp_policies_are_rejected_where_they_do_not_apply(world_of_one):
    with pytest.raises(ValueError, match=r"mixed_precision=torch.bfloat16 .* needs a CUDA device, got device=cpu"):
        wrap_policy(tiny_llama(), "fsdp", device="cpu", mixed_precision=torch.bfloat16)
    with pytest.raises(ValueError, match=r"are FSDP2 policies \(strategy='fsdp'\); strategy='ddp' takes none"):
        wrap_policy(tiny_llama(), "ddp", device="cpu", cpu_offload=True)
    with pytest.raises(ValueError, match=r"mixed_precision must be a floating torch.dtype"):
        wrap_policy(tiny_llama(), "fsdp", device="cpu", mixed_precision=torch.int8)
    with pytest.raises(ValueError, match=r"cpu_offload=True .* device=cpu computes in host memory already"):
        wrap_policy(tiny_llama(), "fsdp", device="cpu", cpu_offload=True)
    from rl2fx.memory.optimizer import is_checkpointed

    plain = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    with pytest.raises(ValueError, match=r"found no decoder block in Sequential.*trainer\.fsdp_wrap"):
        wrap_policy(plain, "fsdp", device="cpu", activation_checkpointing=True)
    assert not is_checkpointed(plain)  # checked before the model is touched
    sharded = wrap_policy(tiny_llama(), "fsdp", device="cpu")
    assert find_block_class(sharded).__name__ == "FSDPLlamaDecoderLayer"  # found by the user's class name
    with pytest.raises(ValueError, match=r"model is already wrapped \(FSDPLlamaForCausalLM\)"):
        wrap_policy(sharded, "fsdp", device="cpu")


def test_checkpoint_from_another_config_is_one_clear_error(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = tiny_llama()
    save_sharded(tmp_path / "ckpt", model)
    other = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False))
    with pytest.raises(ValueError, match=r"does not fit this model .*not in model: \['model.layers.1.*shape differs: "
                                         r"\['lm_head.weight \(64, 32\) vs \(64, 16\)'"):
        load_sharded(tmp_path / "ckpt", other)
    with pytest.raises(ValueError, match=r"holds no optimizer state"):
        load_sharded(tmp_path / "ckpt", model, torch.optim.Adam(model.parameters()))
    with pytest.raises(FileNotFoundError, match=r"no torch.distributed.checkpoint at .*nowhere"):
        load_sharded(tmp_path / "nowhere", model)
    assert load_sharded(tmp_path / "ckpt", model) == {}


def test_save_replaces_a_checkpoint_whole_and_checks_extra_state(tmp_path):
    import dataclasses

    model = tiny_llama()
    save_sharded(tmp_path / "ckpt", model, extra_state={"step": 1})
    (tmp_path / "ckpt" / "stale.txt").write_text("from an older save")
    save_sharded(tmp_path / "ckpt", model)  # no extra_state this time
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no partial directory left
    assert not (tmp_path / "ckpt" / "stale.txt").exists()
    assert load_sharded(tmp_path / "ckpt", tiny_llama(seed=1)) == {}  # not the older save's extra_state

    @dataclasses.dataclass
    class State:
        coef: float

    with pytest.raises(ValueError, match=r"extra_state\['kl'\]\[0\] is a State; extra_state holds tensors"):
        save_sharded(tmp_path / "other", model, extra_state={"kl": [State(0.1)]})
    assert not (tmp_path / "other").exists() and not (tmp_path / ".other.partial").exists()


# --------------------------------------------------------------------------- CUDA only
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def nccl_world_of_one(tmp_path):
    import torch.distributed as dist

    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("cpu_offload", [False, True])
def test_fsdp_bf16_parameters_on_cuda(nccl_world_of_one, cpu_offload):
    from torch.distributed.tensor import DTensor

    _, ref_metrics = single_process(steps=1)
    model = wrap_policy(tiny_llama(), "fsdp", device="cuda", mixed_precision=torch.bfloat16, cpu_offload=cpu_offload)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    batch = {k: v.cuda() for k, v in whitened_batch().items()}
    # a mesh of one: the local shard is the whole parameter (no all-gather of host tensors over NCCL)
    before = {n: p.to_local().detach().cpu().clone() for n, p in model.named_parameters()}
    out = step(model, opt, batch, 0, ROWS // 2)
    # the forward and backward ran in bf16: loss and gradient norm agree with float32 to bf16 precision
    assert out["loss"] == pytest.approx(ref_metrics[0]["loss"], rel=0.1)
    assert out["grad_norm"] == pytest.approx(ref_metrics[0]["grad_norm"], rel=0.1)
    assert all(isinstance(p, DTensor) and p.dtype == torch.float32 for p in model.parameters())  # fp32 masters
    want = "cpu" if cpu_offload else "cuda"
    assert all(p.to_local().device.type == want for p in model.parameters())
    after = {n: p.to_local().detach().cpu().clone() for n, p in model.named_parameters()}
    assert max((after[n] - before[n]).abs().max().item() for n in after) > 1e-3  # the step moved the masters
