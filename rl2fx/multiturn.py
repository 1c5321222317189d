r"""Multi-turn rollouts with an environment, token in, token out.

:func:`multi_turn_rollout` alternates the model and an environment
(:mod:`rl2fx.envs`, RL2's ``env_step`` protocol) for up to ``max_turns`` turns:

1. every trajectory still running is continued from its own tokens: one batched
   ``generate`` call per turn over the running trajectories only (finished ones
   leave the batch), left-padded so each keeps the positions it will have in
   the final batch;
2. the sampled tokens are appended exactly as ``generate`` returned them, up to
   and including the first ``eos_token_id`` (never decoded and re-encoded: that
   round trip is not the identity, the mismatch OpenRLHF #1094 and slime #117
   fixed), with ``action_mask`` 1 and their log-probs under the sampler;
3. the environment sees the decoded response (``sample.action_text``) and returns
   ``next_state``, ``reward``, ``done``; the reward goes on the last token of the
   turn; the text that ``next_state`` adds after ``state_text + action_text`` is
   tokenised and appended with ``action_mask`` 0. A ``next_state`` that does not
   extend the previous text starts a new *segment*: a fresh context, tokenised
   from ``next_state``, as RL2's ``add_env_response`` does; the trajectory then
   spans several rows of the batch.

**The result** (``R`` rows: one per segment, a trajectory's segments in order and
contiguous, the trajectories of one prompt contiguous; ``R = B = N * G`` when no
segment breaks, then the batch goes straight to
:func:`rl2fx.experience.make_experience`):

- ``input_ids``, ``attention_mask`` ``[R, P + T]``: each row's start (the prompt,
  or a segment's fresh state) left-padded to ``P``, everything after it
  right-padded to ``T``;
- ``response_ids`` ``[R, T]``: all tokens after the start, model and environment;
- ``response_mask`` ``[R, T]`` (float): the action mask, 1 on model tokens, 0 on
  environment tokens and padding: the ``mask`` every estimator takes
  (masked equals packed, DESIGN.md);
- ``rewards`` ``[R, T]``: each turn's reward on the last model token of that turn;
- ``behavior_logprobs`` ``[R, T]``: :math:`\log\mathrm{softmax}(z/\tau)_a` of each
  sampled token ``a`` from the sampler's raw logits ``z`` at temperature
  :math:`\tau` (0 where the mask is 0). These are the log-probs of the
  temperature-scaled distribution *before* top-k/top-p truncation, the quantity
  :func:`rl2fx.logprobs.response_logprobs` and the PPO loss compute, so the
  ratio to them is 1 on-policy; with top-k/top-p the tokens were drawn from the
  truncated distribution, whose log-probs differ by its log-mass;
- ``turn_ids`` ``[R, T]``: the turn (1, 2, ...) a token belongs to, environment
  tokens included; 0 on padding;
- ``sample_index``, ``segment_index`` ``[R]``: the trajectory (``0..B-1``) and
  segment of each row;
- per trajectory ``[B]``: ``turns`` (model turns taken), ``scores`` (sum of its
  turn rewards), ``failed`` (1 where the environment raised; that trajectory's
  rows get ``response_mask`` 0, reward 0 and score 0, so none of its tokens is
  trained on; a group baseline still counts its score 0 unless the caller drops
  the trajectory's group or its row), ``truncated`` (1 where ``max_length`` ended it).

:func:`multi_turn_stats` summarises a result for logging. With segment breaks
(``R > B``) the forward passes stay per row, and the estimators run per
trajectory: :func:`to_trajectories` lays each trajectory's rows end to end
(``[B, S]``), :func:`from_trajectories` maps the result back to rows; the
masked-out padding between segments changes nothing (masked equals packed).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from rl2fx._typing import Int, Tensor, check_range
from rl2fx.envs import EnvError, EnvResponse, EnvSample, LoadedEnv, load_env, step_env
from rl2fx.logprobs import eval_mode

__all__ = ["multi_turn_rollout", "multi_turn_stats", "to_trajectories", "from_trajectories"]

logger = logging.getLogger(__name__)


@dataclass
class _Segment:
    start: list[int]  # the context this segment starts from (prompt or a fresh state)
    tokens: list[int] = field(default_factory=list)  # everything after the start
    action: list[int] = field(default_factory=list)
    logps: list[float] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    turn_ids: list[int] = field(default_factory=list)

    def context(self) -> list[int]:
        return self.start + self.tokens

    def append(self, tokens: Sequence[int], *, action: int, turn: int, logps: Sequence[float] | None = None) -> None:
        self.tokens += list(tokens)
        self.action += [action] * len(tokens)
        self.logps += list(logps) if logps is not None else [0.0] * len(tokens)
        self.rewards += [0.0] * len(tokens)
        self.turn_ids += [turn] * len(tokens)


@dataclass
class _Trajectory:
    sample: EnvSample
    segments: list[_Segment]
    done: bool = False
    failed: bool = False
    truncated: bool = False
    error: str = ""
    total_reward: float = 0.0


def _encode(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    ids = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    return [int(i) for i in ids]


def _left_pad(seqs: Sequence[Sequence[int]], pad: int) -> tuple[Tensor, Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask


class _TextStop:
    """A ``generate`` stopping criterion: a row stops once its decoded response contains one of ``stops``.

    It records the number of new tokens at which each row first matched, so the
    response is cut there (the tokens ``generate`` adds after a finished row are padding).
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str], prompt_len: int, rows: int):
        self.tokenizer, self.stops, self.prompt_len = tokenizer, tuple(stops), prompt_len
        self.length = [0] * rows  # 0: not stopped by text

    def __call__(self, input_ids: Tensor, scores: Any = None, **kwargs: Any) -> Tensor:
        new = input_ids[:, self.prompt_len:]
        hit = torch.zeros(new.shape[0], dtype=torch.bool, device=input_ids.device)
        for i, row in enumerate(new.tolist()):
            if self.length[i]:
                hit[i] = True
                continue
            text = self.tokenizer.decode(row, skip_special_tokens=True)
            if any(st in text for st in self.stops):
                self.length[i] = len(row)
                hit[i] = True
        return hit


@torch.no_grad()
def _generate(model: torch.nn.Module, tokenizer: Any, contexts: Sequence[Sequence[int]], *, max_new_tokens: int,
              eos: tuple[int, ...], pad_token_id: int, temperature: float, top_k: int, top_p: float,
              stop: Sequence[str], device: torch.device) -> list[tuple[list[int], list[float]]]:
    """Sample one response per context; per row the tokens up to the first eos (included) or the first stop string,
    and their log-probs."""
    from transformers import GenerationConfig, StoppingCriteriaList

    ids, mask = _left_pad(contexts, pad_token_id)
    ids, mask = ids.to(device), mask.to(device)
    cfg = GenerationConfig(do_sample=True, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                           top_p=top_p, eos_token_id=list(eos), pad_token_id=pad_token_id,
                           output_logits=True, return_dict_in_generate=True)
    text_stop = _TextStop(tokenizer, stop, ids.shape[1], ids.shape[0]) if stop else None
    extra: dict[str, Any] = {}
    if text_stop is not None:
        extra["stopping_criteria"] = StoppingCriteriaList([text_stop])  # type: ignore[list-item]
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg, **extra)  # type: ignore[operator]
    new = out.sequences[:, ids.shape[1]:]
    # out.logits: one [rows, vocab] tensor per step, the raw logits before any processor (temperature, top-k/p)
    logits = torch.stack(out.logits, dim=1).float()
    lp = torch.log_softmax(logits / temperature, dim=-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
    res = []
    for i, (row, row_lp) in enumerate(zip(new.tolist(), lp.tolist(), strict=True)):
        n = next((k + 1 for k, t in enumerate(row) if t in eos), len(row))
        if text_stop is not None and text_stop.length[i]:
            n = min(n, text_stop.length[i])
        res.append((row[:n], row_lp[:n]))
    return res


def _truncate(t: _Trajectory) -> None:
    """End ``t`` for lack of room: drop what follows its last response (environment text no model turn reads)."""
    t.done = t.truncated = True
    seg = t.segments[-1]
    if 1 not in seg.action:  # a fresh segment that never got a response
        t.segments.pop()
        return
    keep = len(seg.action) - seg.action[::-1].index(1)
    for name in ("tokens", "action", "logps", "rewards", "turn_ids"):
        del getattr(seg, name)[keep:]


def _fail(traj: _Trajectory, err: BaseException, env: LoadedEnv) -> None:
    traj.failed, traj.done = True, True
    traj.error = f"environment {env.name!r}, sample {traj.sample.index}, turn {traj.sample.turn}: " \
                 f"env_step raised {type(err).__name__}: {err}"
    logger.warning("%s (the sample is failed, the rollout goes on)", traj.error)


@torch.no_grad()
def multi_turn_rollout(
    model: torch.nn.Module,
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    env: Any,
    *,
    prompt_texts: Sequence[str],
    prompt_ids: Int[Tensor, "n p"] | None = None,
    prompt_mask: Int[Tensor, "n p"] | None = None,
    responses_per_prompt: int = 1,
    max_turns: int = 2,
    max_new_tokens: int = 64,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop: Sequence[str] = (),
    add_special_tokens: bool = False,
    skip_special_tokens: bool = True,
    max_length: int | None = None,
) -> dict[str, Tensor]:
    """Sample ``responses_per_prompt`` trajectories per row, alternating ``model`` and ``env`` for up to ``max_turns`` turns.

    ``rows``: the dataset rows (``sample.sample`` for the environment);
    ``prompt_texts``: the first state of each row (``sample.state_text``, e.g. a
    rendered chat prompt, :func:`rl2fx.prompts.render_prompt`). The first context's
    tokens are ``prompt_ids`` (left-padded, ``prompt_mask`` 0 on the padding) when
    given, else ``prompt_texts`` tokenised with ``add_special_tokens``, which also
    applies to a fresh segment's state; the text an environment appends is
    tokenised without special tokens. ``env``: a path to an environment file or an
    object with ``env_step`` (:func:`rl2fx.envs.load_env`).

    ``max_new_tokens`` bounds each turn's response; a response also ends at an
    ``eos_token_id`` (one id or several; default the tokenizer's) or, when ``stop``
    is given, once its decoded text contains one of these strings (kept in the
    response, as SGLang's ``no_stop_trim``): a tool call such as ``</calc>`` then
    gets its result before the model goes on. ``max_length`` bounds a row's tokens
    (its start and everything after it): a trajectory whose context leaves fewer
    than ``max_new_tokens`` positions ends there, flagged ``truncated``, without the
    environment text after its last response; a prompt that does not fit raises.

    ``sample.action_text`` is the response decoded with ``skip_special_tokens``
    (``True``: SGLang's default, as RL2 sees it; ``False`` keeps e.g. a chat model's
    end-of-turn token, so that an environment that re-renders the chat template
    extends ``state_text + action_text`` without repeating it). Sampling draws from
    torch's global RNG; the model is in eval mode during the rollout and its mode
    is restored. The tensors are returned on the model's device.

    Returns the tensors described in :mod:`rl2fx.multiturn`. An environment that
    raises fails its trajectory only (logged with the environment, sample and
    turn, counted in ``failed``); if every trajectory fails the rollout raises
    :class:`~rl2fx.envs.EnvError` with the first error. A malformed ``env_step``
    result raises :class:`~rl2fx.envs.EnvError` at once.

    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> from rl2fx.testing.tokenizers import char_tokenizer
    >>> tok = char_tokenizer()
    >>> _ = torch.manual_seed(0)
    >>> m = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, n_positions=64,
    ...                                     bos_token_id=1, eos_token_id=2))
    >>> def env_step(s):  # echo the turn number; reward 1 at the end
    ...     return {"next_state": s.state_text + s.action_text + f"\\nturn {s.turn}:", "done": s.turn == 2,
    ...             "reward": float(s.turn == 2)}
    >>> out = multi_turn_rollout(m, tok, [{"q": 1}], env_step, prompt_texts=["go:"], responses_per_prompt=2,
    ...                          max_turns=3, max_new_tokens=3)
    >>> out["turns"].tolist(), out["scores"].tolist(), out["response_mask"].shape[0]
    ([2, 2], [1.0, 1.0], 2)
    """
    check_range("max_turns", max_turns, 1, None)
    check_range("responses_per_prompt", responses_per_prompt, 1, None)
    check_range("max_new_tokens", max_new_tokens, 1, None)
    check_range("temperature", temperature, 0.0, None, low_inclusive=False)
    if max_length is not None:
        check_range("max_length", max_length, max_new_tokens + 1, None)
    rows, prompt_texts = list(rows), list(prompt_texts)
    if len(prompt_texts) != len(rows):
        raise ValueError(f"prompt_texts has {len(prompt_texts)} entries but rows has {len(rows)}; one per row")
    for i, t in enumerate(prompt_texts):
        if not isinstance(t, str):
            raise ValueError(f"prompt_texts[{i}] must be a string (the first state_text), got {type(t).__name__}")
    eos_id = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    pad = tokenizer.pad_token_id if pad_token_id is None else pad_token_id
    if eos_id is None or pad is None:
        raise ValueError(f"eos_token_id={eos_id} and pad_token_id={pad}: both are needed (pass them or set them "
                         f"on the tokenizer)")
    eos = (int(eos_id),) if isinstance(eos_id, int) else tuple(int(e) for e in eos_id)
    if not eos:
        raise ValueError("eos_token_id is an empty sequence; give at least one id")
    stop = list(stop)
    for i, st in enumerate(stop):
        if not isinstance(st, str) or not st:
            raise ValueError(f"stop[{i}] must be a non-empty string, got {st!r}")
    loaded = load_env(env)
    if prompt_ids is not None:
        if prompt_ids.shape[0] != len(rows):
            raise ValueError(f"prompt_ids has {prompt_ids.shape[0]} rows but rows has {len(rows)}")
        pm = torch.ones_like(prompt_ids) if prompt_mask is None else prompt_mask
        starts = [[int(t) for t, m in zip(r.tolist(), mr.tolist(), strict=True) if m] for r, mr in zip(prompt_ids, pm,
                                                                                                    strict=True)]
    else:
        starts = [_encode(tokenizer, t, add_special_tokens) for t in prompt_texts]
    for i, s in enumerate(starts):
        if not s:
            raise ValueError(f"prompt row {i} has 0 tokens ({prompt_texts[i]!r})")
        if max_length is not None and len(s) + max_new_tokens > max_length:
            raise ValueError(f"prompt row {i} has {len(s)} tokens: with max_new_tokens={max_new_tokens} it does not "
                             f"fit max_length={max_length}")

    trajs: list[_Trajectory] = []
    for i, row in enumerate(rows):
        for _ in range(responses_per_prompt):
            sample = EnvSample(sample=copy.deepcopy(dict(row)), state_text=prompt_texts[i], index=len(trajs))
            trajs.append(_Trajectory(sample=sample, segments=[_Segment(start=list(starts[i]))]))

    inner: Any = getattr(model, "module", model)
    device = next(inner.parameters()).device
    with eval_mode(inner):
        for turn in range(1, max_turns + 1):
            for t in trajs:
                if not t.done and max_length is not None and len(t.segments[-1].context()) + max_new_tokens > max_length:
                    _truncate(t)
            active = [t for t in trajs if not t.done]
            if not active:
                break
            outs = _generate(inner, tokenizer, [t.segments[-1].context() for t in active],
                             max_new_tokens=max_new_tokens, eos=eos, pad_token_id=pad, temperature=temperature,
                             top_k=top_k, top_p=top_p, stop=stop, device=device)
            for t, (toks, lps) in zip(active, outs, strict=True):
                t.segments[-1].append(toks, action=1, turn=turn, logps=lps)
                t.sample.action_text = tokenizer.decode(toks, skip_special_tokens=skip_special_tokens)
                t.sample.turn = turn
            responses = step_env(loaded, [t.sample for t in active])
            for t, resp in zip(active, responses, strict=True):
                if isinstance(resp, Exception):
                    _fail(t, resp, loaded)
                    continue
                _apply(t, resp, tokenizer, add_special_tokens, last_turn=turn == max_turns, env=loaded)
    failed = [t for t in trajs if t.failed]
    if trajs and len(failed) == len(trajs):
        raise EnvError(f"every sample failed ({len(trajs)} of {len(trajs)}); the first: {failed[0].error}")
    return {k: v.to(device) for k, v in _layout(trajs, pad).items()}


def _apply(t: _Trajectory, resp: EnvResponse, tokenizer: Any, add_special_tokens: bool, *, last_turn: bool,
           env: LoadedEnv) -> None:
    seg, s = t.segments[-1], t.sample
    seg.rewards[-1] = resp["reward"]  # the last token of this turn is the model's last sampled token
    t.total_reward += resp["reward"]
    if resp["done"] or last_turn:
        t.done = True
        return
    nxt = resp["next_state"]
    assert nxt is not None  # check_env_response: text when not done
    prefix = s.state_text + s.action_text
    if nxt.startswith(prefix):
        seg.append(_encode(tokenizer, nxt[len(prefix):], False), action=0, turn=s.turn)
    else:
        start = _encode(tokenizer, nxt, add_special_tokens)
        if not start:
            raise EnvError(f"environment {env.name!r}, sample {s.index}: next_state {nxt!r} starts a new segment "
                           f"but has 0 tokens")
        t.segments.append(_Segment(start=start))
    s.state_text = nxt


def _layout(trajs: Sequence[_Trajectory], pad: int) -> dict[str, Tensor]:
    segs = [(i, j, seg) for i, t in enumerate(trajs) for j, seg in enumerate(t.segments)]
    r = len(segs)
    p = max((len(seg.start) for _, _, seg in segs), default=0)
    tt = max((len(seg.tokens) for _, _, seg in segs), default=0)
    input_ids = torch.full((r, p + tt), pad, dtype=torch.long)
    attn = torch.zeros((r, p + tt), dtype=torch.long)
    resp_mask = torch.zeros((r, tt))
    rewards = torch.zeros((r, tt))
    blp = torch.zeros((r, tt))
    turn_ids = torch.zeros((r, tt), dtype=torch.long)
    for k, (i, _, seg) in enumerate(segs):
        n0, n = len(seg.start), len(seg.tokens)
        input_ids[k, p - n0:p] = torch.tensor(seg.start, dtype=torch.long)
        attn[k, p - n0:p + n] = 1
        if n:
            input_ids[k, p:p + n] = torch.tensor(seg.tokens, dtype=torch.long)
            turn_ids[k, :n] = torch.tensor(seg.turn_ids, dtype=torch.long)
            if not trajs[i].failed:  # a failed trajectory's tokens are not trained on
                resp_mask[k, :n] = torch.tensor(seg.action, dtype=torch.float32)
                rewards[k, :n] = torch.tensor(seg.rewards, dtype=torch.float32)
            blp[k, :n] = torch.tensor(seg.logps, dtype=torch.float32)
    blp = torch.where(resp_mask > 0, blp, 0.0)
    return {
        "input_ids": input_ids,
        "attention_mask": attn,
        "response_ids": input_ids[:, p:].clone(),
        "response_mask": resp_mask,
        "rewards": rewards,
        "behavior_logprobs": blp,
        "turn_ids": turn_ids,
        "sample_index": torch.tensor([i for i, _, _ in segs], dtype=torch.long),
        "segment_index": torch.tensor([j for _, j, _ in segs], dtype=torch.long),
        "turns": torch.tensor([t.sample.turn for t in trajs], dtype=torch.long),
        "scores": torch.tensor([0.0 if t.failed else t.total_reward for t in trajs]),
        "failed": torch.tensor([t.failed for t in trajs], dtype=torch.long),
        "truncated": torch.tensor([t.truncated for t in trajs], dtype=torch.long),
    }


def multi_turn_stats(batch: Mapping[str, Tensor]) -> dict[str, float]:
    """Numbers to log from a :func:`multi_turn_rollout` result.

    Over the trajectories that did not fail: turns (mean, max), model and
    environment tokens per trajectory, segments per trajectory, the mean score,
    and per turn ``k`` the mean reward (``turn_k/reward_mean``) and response
    length (``turn_k/response_length_mean``) of the trajectories that took that
    turn. Over all: the number of ``failed`` and ``truncated`` trajectories.

    >>> b = {"turns": torch.tensor([1, 2]), "failed": torch.tensor([0, 0]), "truncated": torch.tensor([0, 0]),
    ...      "scores": torch.tensor([1.0, 0.5]), "sample_index": torch.tensor([0, 1]),
    ...      "response_mask": torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0]]),
    ...      "rewards": torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.5, 0.0]]),
    ...      "turn_ids": torch.tensor([[1, 1, 0, 0], [1, 1, 2, 0]])}
    >>> st = multi_turn_stats(b)
    >>> st["turns_mean"], st["env_tokens_mean"], st["turn_1/reward_mean"], st["turn_2/response_length_mean"]
    (1.5, 0.5, 0.5, 1.0)
    """
    n = int(batch["turns"].shape[0])
    if n == 0:
        return {}
    idx, mask, turn_ids = batch["sample_index"], batch["response_mask"], batch["turn_ids"]
    ok = batch["failed"] == 0
    turns = batch["turns"]

    def per_traj(x: Tensor) -> Tensor:  # [R, T] -> [B]: summed over a trajectory's tokens and segments
        return torch.zeros(n, dtype=torch.float64).index_add_(0, idx, x.double().sum(-1))

    def mean(x: Tensor, sel: Tensor) -> float:
        return float(x[sel].mean()) if bool(sel.any()) else 0.0

    real = turn_ids > 0
    out = {
        "turns_mean": mean(turns.double(), ok),
        "turns_max": float(turns[ok].max()) if bool(ok.any()) else 0.0,
        "model_tokens_mean": mean(per_traj(mask), ok),
        "env_tokens_mean": mean(per_traj(real & (mask == 0)), ok),
        "segments_per_sample": mean(torch.zeros(n, dtype=torch.float64).index_add_(
            0, idx, torch.ones(idx.shape[0], dtype=torch.float64)), ok),
        "score_mean": mean(batch["scores"].double(), ok),
        "failed": float((~ok).sum()),
        "truncated": float(batch["truncated"].sum()) if "truncated" in batch else 0.0,
    }
    for k in range(1, int(turns.max()) + 1):
        took = ok & (turns >= k)
        at_k = turn_ids == k
        out[f"turn_{k}/reward_mean"] = mean(per_traj(torch.where(at_k, batch["rewards"], 0.0)), took)
        out[f"turn_{k}/response_length_mean"] = mean(per_traj(at_k & (mask > 0)), took)
    return out


def _segment_layout(batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, int, int]:
    idx, seg = batch["sample_index"], batch["segment_index"]
    n = int(batch["turns"].shape[0])
    width = int(seg.max()) + 1 if seg.numel() else 1
    return idx, seg, n, width


def to_trajectories(x: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
    """Per-row values ``[R, T]`` laid out per trajectory, ``[B, S * T]``: segment ``j`` of trajectory ``i`` at
    columns ``j*T .. (j+1)*T - 1`` of row ``i``, zeros (and mask 0, when ``x`` is the mask) where a trajectory has
    fewer segments.

    >>> b = {"sample_index": torch.tensor([0, 0, 1]), "segment_index": torch.tensor([0, 1, 0]),
    ...      "turns": torch.tensor([2, 1])}
    >>> to_trajectories(torch.tensor([[1, 2], [3, 4], [5, 6]]), b).tolist()
    [[1, 2, 3, 4], [5, 6, 0, 0]]
    """
    idx, seg, n, width = _segment_layout(batch)
    r, t = x.shape[0], x.shape[-1]
    if r != idx.shape[0]:
        raise ValueError(f"x has {r} rows but the batch has {idx.shape[0]} (one per segment)")
    out = x.new_zeros((n, width * t))
    cols = seg.unsqueeze(-1) * t + torch.arange(t, device=x.device)
    return out.index_put_((idx.unsqueeze(-1).expand(-1, t), cols), x)


def from_trajectories(y: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
    """The inverse of :func:`to_trajectories`: ``[B, S * T]`` back to one row per segment ``[R, T]``.

    >>> b = {"sample_index": torch.tensor([0, 0, 1]), "segment_index": torch.tensor([0, 1, 0]),
    ...      "turns": torch.tensor([2, 1])}
    >>> from_trajectories(torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]]), b).tolist()
    [[1, 2], [3, 4], [5, 6]]
    """
    idx, seg, n, width = _segment_layout(batch)
    if y.shape[0] != n or y.shape[-1] % width:
        raise ValueError(f"y has shape {tuple(y.shape)}; expected [{n}, a multiple of {width}] (to_trajectories' layout)")
    t = y.shape[-1] // width
    cols = seg.unsqueeze(-1) * t + torch.arange(t, device=y.device)
    return y[idx.unsqueeze(-1).expand(-1, t), cols]
