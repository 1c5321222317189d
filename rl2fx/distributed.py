"""Parallel strategies (single device, DDP, FSDP2) and distributed checkpoints (core layer).

:func:`wrap_policy` turns a model into what ``strategy`` asks for:

- ``single``: the model on ``device``; one process only.
- ``ddp``: :class:`~torch.nn.parallel.DistributedDataParallel`; every rank holds the whole
  model, its gradients and its optimizer state, and gradients are averaged by all-reduce.
- ``fsdp``: FSDP2 (:func:`torch.distributed.fsdp.fully_shard`, Zhao et al. 2023, "PyTorch
  FSDP"): ``fully_shard`` on each decoder block, then on the root, over a 1-D
  :class:`~torch.distributed.device_mesh.DeviceMesh`. Every rank holds ``1/world`` of each
  parameter, gradient and optimizer state (a ``DTensor`` sharded on dim 0); a block's
  parameters are all-gathered just before its forward and freed after it (and again
  for its backward), so no rank ever holds a full copy of the model.

:func:`rl2fx.step.train_step` handles all three (gradient sync on the last micro-batch
only, global gradient clipping over shards). :func:`save_sharded` / :func:`load_sharded`
write and read ``torch.distributed.checkpoint`` directories: each rank writes its own
shards, and a checkpoint written by ``W`` ranks loads in any number of ranks (or in one
process without ``torch.distributed``). :func:`save_consolidated` writes one
``save_pretrained`` model for use outside rl2fx.

This module is core: it never imports the application layer (``rl2fx.trainer``).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from rl2fx._typing import check_choice

__all__ = [
    "STRATEGIES",
    "wrap_policy",
    "find_block_class",
    "unwrap",
    "is_sharded",
    "world_size",
    "gradient_sync",
    "total_grad_norm",
    "reshard",
    "generate_kwargs",
    "save_sharded",
    "load_sharded",
    "save_consolidated",
]

#: The parallel strategies :func:`wrap_policy` knows (the one source of their names).
STRATEGIES: tuple[str, ...] = ("single", "ddp", "fsdp")

_EXTRA_FILE = "extra_state.pt"
_FSDP_WRAP_HINT = "set trainer.fsdp_wrap (wrap_cls=) to the class name of the model's repeated block"


def world_size(group: Any = None) -> int:
    """Processes in ``group`` (1 when ``torch.distributed`` is not initialised).

    >>> world_size()
    1
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group)
    return 1


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` is an FSDP2 module (``fully_shard`` was applied to it).

    >>> is_sharded(torch.nn.Linear(2, 2))
    False
    """
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside a DDP wrapper (FSDP2 modules are the user's model itself).

    >>> m = torch.nn.Linear(2, 2)
    >>> unwrap(m) is m
    True
    """
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def find_block_class(model: nn.Module, wrap_cls: str | None = None) -> type[nn.Module]:
    """The class of ``model``'s decoder block, the unit FSDP2 shards and gathers one at a time.

    ``wrap_cls`` (the ``trainer.fsdp_wrap`` override) names the class outright. Otherwise the
    first class named in a transformers model's ``_no_split_modules`` that occurs in the
    model (e.g. ``LlamaDecoderLayer``) is taken. A model with neither raises a
    ``ValueError`` that names the override.

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16,
    ...                                  num_hidden_layers=2, num_attention_heads=2))
    >>> find_block_class(m).__name__
    'LlamaDecoderLayer'
    >>> find_block_class(torch.nn.Linear(2, 2))
    Traceback (most recent call last):
    ...
    ValueError: fsdp found no decoder block in Linear (no transformers _no_split_modules); set trainer.fsdp_wrap (wrap_cls=) to the class name of the model's repeated block
    """
    by_name: dict[str, type[nn.Module]] = {}
    for m in model.modules():
        # fully_shard swaps a module's class for a generated FSDP<Name> subclass: match the user's names too
        for c in type(m).__mro__:
            if issubclass(c, nn.Module) and c is not nn.Module:
                by_name.setdefault(c.__name__, type(m))
    if wrap_cls is not None:
        if wrap_cls not in by_name:
            raise ValueError(f"trainer.fsdp_wrap (wrap_cls) = {wrap_cls!r} names no module class of "
                             f"{type(model).__name__}; its classes are {sorted(by_name)}")
        return by_name[wrap_cls]
    names: list[str] = []
    for m in model.modules():
        names += [n for n in (getattr(m, "_no_split_modules", None) or []) if n not in names]
    for n in names:
        if n in by_name:
            return by_name[n]
    why = f"_no_split_modules {names} match no submodule" if names else "no transformers _no_split_modules"
    raise ValueError(f"fsdp found no decoder block in {type(model).__name__} ({why}); {_FSDP_WRAP_HINT}")


def _check_strategy(strategy: str, world: int) -> None:
    check_choice("strategy", strategy, STRATEGIES)
    initialised = dist.is_available() and dist.is_initialized()
    if strategy == "single" and world > 1:
        raise ValueError(f"strategy='single' runs in one process, but this run has {world} processes "
                         "(WORLD_SIZE); use strategy='ddp' or 'fsdp' under torchrun")
    if strategy != "single" and not initialised:
        raise ValueError(f"strategy={strategy!r} needs torch.distributed initialised (launch with torchrun, "
                         "then torch.distributed.init_process_group); one process without it: strategy='single'")


def wrap_policy(
    model: nn.Module,
    strategy: str,
    *,
    device: torch.device | str | None = None,
    mesh: Any = None,
    mixed_precision: torch.dtype | None = None,
    cpu_offload: bool = False,
    wrap_cls: str | None = None,
    activation_checkpointing: bool = False,
) -> nn.Module:
    """``model`` prepared for ``strategy`` (``single``, ``ddp`` or ``fsdp``); see the module docstring.

    ``device``: where parameters live (default: the current CUDA device when CUDA is
    available, else CPU; under ``torchrun`` call ``torch.cuda.set_device(LOCAL_RANK)``
    first). Under ``fsdp`` the mesh's device decides (``mesh`` default:
    ``init_device_mesh(device.type, (world,))``) and parameters move there shard by shard.
    Every setting is checked before the model is touched.
    ``mixed_precision`` (``fsdp`` only, CUDA only): FSDP2's ``MixedPrecisionPolicy`` with
    parameters all-gathered and computed in that dtype (e.g. ``torch.bfloat16``) and
    gradients reduced in float32; the sharded master parameters and the optimizer state
    stay float32. ``cpu_offload`` (``fsdp`` only): FSDP2's ``CPUOffloadPolicy``; the
    sharded parameters, gradients and optimizer state live in pinned host memory and the
    optimizer steps on the CPU. ``activation_checkpointing``: recompute each block's
    activations in the backward pass (:func:`rl2fx.memory.enable_checkpointing`), applied
    before sharding so the recomputed forward gathers its parameters again.

    Build the optimizer on the returned module's ``parameters()`` (under ``fsdp`` they are
    the sharded ``DTensor`` parameters), before its first forward pass.

    >>> m = wrap_policy(torch.nn.Linear(2, 2), "single", device="cpu")
    >>> type(m).__name__
    'Linear'
    >>> wrap_policy(torch.nn.Linear(2, 2), "zero3")
    Traceback (most recent call last):
    ...
    ValueError: strategy must be one of ['single', 'ddp', 'fsdp'], got 'zero3'
    """
    world = world_size()
    _check_strategy(strategy, world)
    if is_sharded(model) or unwrap(model) is not model:
        raise ValueError(f"model is already wrapped ({type(model).__name__}); pass the unwrapped model to wrap_policy")
    if strategy != "fsdp" and (mixed_precision is not None or cpu_offload or wrap_cls is not None):
        raise ValueError(f"mixed_precision={mixed_precision}, cpu_offload={cpu_offload} and wrap_cls={wrap_cls!r} "
                         f"are FSDP2 policies (strategy='fsdp'); strategy={strategy!r} takes none of them "
                         "(mixed precision there: train_step's autocast_dtype)")
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else \
            torch.device("cpu")
    device = torch.device(device)
    if mixed_precision is not None:
        if not (isinstance(mixed_precision, torch.dtype) and mixed_precision.is_floating_point):
            raise ValueError(f"mixed_precision must be a floating torch.dtype or None, got {mixed_precision!r}")
        if device.type != "cuda":
            raise ValueError(f"mixed_precision={mixed_precision} (FSDP2 low-precision parameters) needs a CUDA "
                             f"device, got device={device}; on CPU keep float32 parameters (mixed_precision=None)")
    if cpu_offload and device.type != "cuda":
        raise ValueError(f"cpu_offload=True (FSDP2's CPUOffloadPolicy) keeps the shards in host memory while an "
                         f"accelerator computes; device={device} computes in host memory already: "
                         "use cpu_offload=False")
    block_cls = find_block_class(model, wrap_cls) if strategy == "fsdp" else None
    if activation_checkpointing:
        from rl2fx.memory.optimizer import enable_checkpointing

        enable_checkpointing(model)
    if strategy == "single":
        return model.to(device)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else None
        return DistributedDataParallel(model.to(device), device_ids=ids)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
    )

    assert block_cls is not None
    blocks = [m for m in model.modules() if isinstance(m, block_cls)]
    if mesh is None:
        mesh = init_device_mesh(device.type, (world,))
    kwargs: dict[str, Any] = {
        "mesh": mesh,
        "offload_policy": CPUOffloadPolicy() if cpu_offload else OffloadPolicy(),
    }
    if mixed_precision is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=mixed_precision, reduce_dtype=torch.float32)
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Reduce gradients across ranks in this backward pass only if ``enabled``.

    FSDP2: ``set_requires_gradient_sync(enabled)`` (the unsharded gradients accumulate
    locally until a synced backward reduce-scatters their sum); DDP: ``no_sync()`` when
    not enabled; anything else: nothing to do. Sync is switched back on at exit.

    >>> with gradient_sync(torch.nn.Linear(2, 2), False): pass
    """
    if is_sharded(model):
        model.set_requires_gradient_sync(enabled)  # type: ignore[operator]
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)  # type: ignore[operator]
    elif not enabled and hasattr(model, "no_sync"):
        with model.no_sync():  # type: ignore[operator]
            yield
    else:
        yield


def _comm_device(mesh: Any) -> torch.device:
    if mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(mesh.device_type)


def total_grad_norm(params: list[torch.Tensor], max_norm: float | None = None) -> float:
    """The 2-norm of all gradients of ``params`` over all shards; clips to ``max_norm`` if given.

    :math:`\\lVert g\\rVert = (\\sum_p \\lVert g_p\\rVert^2)^{1/2}` over the *whole* parameters,
    and every gradient is scaled by ``min(1, max_norm / (‖g‖ + 1e-6))`` (the rule of
    ``torch.nn.utils.clip_grad_norm_``). For FSDP2's sharded ``DTensor`` gradients each rank
    sums the squares of its shards and one all-reduce adds them up, so every rank gets the
    same norm and scales by the same factor. The all-reduce runs on the mesh's device:
    with ``CPUOffloadPolicy`` the shards are in host memory but the NCCL group has no CPU
    backend, where ``clip_grad_norm_`` on the ``DTensor`` gradients fails
    (pytorch/pytorch#148532).

    >>> w = torch.nn.Parameter(torch.zeros(2)); w.grad = torch.tensor([3.0, 4.0])
    >>> total_grad_norm([w], max_norm=1.0), [round(v, 4) for v in w.grad.tolist()]
    (5.0, [0.6, 0.8])
    """
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    sharded = [g for g in grads if isinstance(g, DTensor)]
    if not sharded:
        if max_norm is not None:
            return float(torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_norm))
        return float(torch.nn.utils.get_total_norm(grads, norm_type=2.0))
    mesh = sharded[0].device_mesh
    if mesh.ndim != 1 or any(g.device_mesh != mesh or not all(pl.is_shard() for pl in g.placements)
                             for g in sharded):
        raise ValueError("total_grad_norm handles gradients sharded over one 1-D mesh (FSDP2's); got placements "
                         f"{sorted({str(g.placements) for g in sharded})} on {len({id(g.device_mesh) for g in sharded})} "
                         "mesh(es)")
    plain = [g for g in grads if not isinstance(g, DTensor)]

    def squares(ts: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        # one sum per device where the tensors live, then one copy each: no host sync per tensor
        out = torch.zeros((), dtype=torch.float64, device=device)
        for dev in {t.device for t in ts}:
            out += torch.stack([t.detach().double().pow(2).sum() for t in ts if t.device == dev]).sum().to(device)
        return out

    comm = _comm_device(mesh)
    sq = squares([g.to_local() for g in sharded], comm)
    dist.all_reduce(sq, group=mesh.get_group())
    total = math.sqrt(float(sq + squares(plain, comm)))
    if max_norm is not None and math.isfinite(total):
        coef = max_norm / (total + 1e-6)
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)
    return total


def reshard(model: nn.Module) -> None:
    """Free an FSDP2 model's gathered parameters after a forward pass without backward.

    A no-grad forward (reference or old log-probs) leaves the root module's parameters
    gathered, as FSDP2 expects a backward to follow; this frees them. No-op otherwise.

    >>> reshard(torch.nn.Linear(2, 2))
    """
    if is_sharded(model):
        model.reshard()  # type: ignore[operator]


def generate_kwargs(model: nn.Module) -> dict[str, Any]:
    """Extra ``model.generate`` arguments a parallel strategy needs.

    FSDP2 with several ranks: ``synced_gpus=True``, so that a rank whose sequences are
    finished keeps running forward passes (each one all-gathers parameters with the
    other ranks) until every rank is done; without it the ranks deadlock.

    >>> generate_kwargs(torch.nn.Linear(2, 2))
    {}
    """
    return {"synced_gpus": True} if is_sharded(model) and world_size() > 1 else {}


# --------------------------------------------------------------------------- checkpoints
def _check_compatible(path: Path, model_sd: Mapping[str, Any]) -> None:
    """One clear error when the checkpoint's model tensors differ from ``model``'s (names or shapes)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if not (path / ".metadata").exists():
        raise FileNotFoundError(f"no torch.distributed.checkpoint at {path} (its .metadata file is missing)")
    meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    saved = {k[len("model."):]: v.size for k, v in meta.items()
             if k.startswith("model.") and isinstance(v, TensorStorageMetadata)}
    have = {k: tuple(v.shape) for k, v in model_sd.items() if isinstance(v, torch.Tensor)}
    missing, unexpected = sorted(set(have) - set(saved)), sorted(set(saved) - set(have))
    shapes = sorted(k for k in set(have) & set(saved) if tuple(saved[k]) != have[k])
    if missing or unexpected or shapes:
        detail = "; ".join(
            f"{what}: {keys[:4]}{' ...' if len(keys) > 4 else ''}"
            for what, keys in (("missing in checkpoint", missing), ("not in model", unexpected),
                               ("shape differs", [f"{k} {tuple(saved[k])} vs {have[k]}" for k in shapes]))
            if keys
        )
        raise ValueError(f"checkpoint {path} does not fit this model (a different model config?): {detail}")


def save_sharded(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    extra_state: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` and ``optimizer`` as a ``torch.distributed.checkpoint`` directory; every rank calls it.

    Each rank writes its own shards of the parameters and the optimizer state (for DDP
    or one process: one copy, deduplicated), plus a ``.metadata`` file that lets any
    number of ranks read it back (:func:`load_sharded`). ``extra_state`` (tensors,
    numbers, strings, nested dicts/lists of them: controller states, counters) is
    global: rank 0's is written to ``extra_state.pt``. Per-rank state such as RNG
    belongs in a file per rank, written by the caller. Returns ``path``.

    >>> import tempfile  # one process, no torch.distributed (DCP warns, then works)
    >>> m = torch.nn.Linear(2, 2); opt = torch.optim.Adam(m.parameters())
    >>> d = save_sharded(tempfile.mkdtemp() + "/step-1", m, opt, extra_state={"step": 1})
    >>> sorted(p.name for p in d.iterdir())
    ['.metadata', '__0_0.distcp', 'extra_state.pt']
    """
    import shutil

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if extra_state is not None:
        _check_extra("extra_state", extra_state)
    path = Path(path)
    on = dist.is_available() and dist.is_initialized()
    lead = not on or dist.get_rank() == 0
    # written under a temporary name and renamed when complete: a crash mid-save never
    # leaves a directory that looks like a checkpoint (nor mixes old and new files)
    partial = path.parent / f".{path.name}.partial"
    if lead:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    if on:
        dist.barrier()
    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
    else:
        state = {"model": get_model_state_dict(model)}
    dcp.save(state, checkpoint_id=str(partial))
    if on:
        dist.barrier()
    if lead:
        if extra_state is not None:
            torch.save(dict(extra_state), partial / _EXTRA_FILE)
        if path.exists():
            shutil.rmtree(path)
        partial.rename(path)
    if on:
        dist.barrier()
    return path


_EXTRA_TYPES = (torch.Tensor, int, float, bool, str, type(None))


def _check_extra(where: str, value: Any) -> None:
    """``extra_state`` must load with ``torch.load(weights_only=True)``: check at save time, naming the entry."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str | int):
                raise ValueError(f"{where} keys must be str or int, got {k!r} ({type(k).__name__})")
            _check_extra(f"{where}[{k!r}]", v)
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_extra(f"{where}[{i}]", v)
    elif not isinstance(value, _EXTRA_TYPES):
        raise ValueError(f"{where} is a {type(value).__name__}; extra_state holds tensors, numbers, strings, None "
                         "and dicts/lists of them (e.g. a controller's state_dict(), or dataclasses.asdict(state))")


def load_sharded(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, Any]:
    """Load a :func:`save_sharded` checkpoint into ``model`` (and ``optimizer``), resharding as needed.

    ``model`` is wrapped for this run's strategy and world size (which may differ from the
    saving run's: 2 FSDP ranks -> 1 process, 2 -> 4, DDP -> FSDP); every rank reads the
    parts of the saved tensors its shards cover. The parameters and the optimizer state
    (Adam's moments and step counts, the learning rates) are restored exactly. A
    checkpoint whose tensors differ in name or shape from ``model``'s raises one
    ``ValueError`` listing them. Returns the ``extra_state`` saved with it (``{}`` if none).

    >>> import tempfile  # one process, no torch.distributed (DCP warns, then works)
    >>> m = torch.nn.Linear(2, 2); d = save_sharded(tempfile.mkdtemp(), m, extra_state={"step": 3})
    >>> other = torch.nn.Linear(2, 2)
    >>> load_sharded(d, other), torch.equal(other.weight, m.weight)
    ({'step': 3}, True)
    >>> load_sharded(d, torch.nn.Linear(3, 2))
    Traceback (most recent call last):
    ...
    ValueError: checkpoint ... does not fit this model (a different model config?): shape differs: ['weight (2, 2) vs (2, 3)']
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    path = Path(path)
    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
    else:
        state = {"model": get_model_state_dict(model)}
    _check_compatible(path, state["model"])
    if optimizer is not None:
        meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        if not any(k.startswith("optim.") for k in meta):
            raise ValueError(f"checkpoint {path} holds no optimizer state (saved with optimizer=None); "
                             "load it with optimizer=None")
    dcp.load(state, checkpoint_id=str(path))
    if optimizer is not None:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        set_model_state_dict(model, state["model"])
    extra = path / _EXTRA_FILE
    return dict(torch.load(extra, weights_only=True)) if extra.exists() else {}


def save_consolidated(model: nn.Module, tokenizer: Any, directory: str | Path) -> Path | None:
    """Write one ``save_pretrained`` model (and tokenizer) from rank 0; every rank calls it.

    The full state dict is gathered to rank 0's host memory one tensor at a time
    (``StateDictOptions(full_state_dict=True, cpu_offload=True)``), so no GPU ever holds
    the whole model. The result loads with ``from_pretrained`` outside rl2fx. Returns the
    directory on rank 0, ``None`` on the others.

    >>> import tempfile
    >>> from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16,
    ...                                  num_hidden_layers=1, num_attention_heads=2))
    >>> d = save_consolidated(m, None, tempfile.mkdtemp())
    >>> torch.equal(AutoModelForCausalLM.from_pretrained(d).lm_head.weight, m.lm_head.weight)
    True
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    on = dist.is_available() and dist.is_initialized()
    out: Path | None = None
    if not on or dist.get_rank() == 0:
        out = Path(directory)
        inner: Any = unwrap(model)
        inner.save_pretrained(out, state_dict=sd)
        config_file = out / "config.json"
        if is_sharded(inner) and config_file.exists():
            # fully_shard swaps the class for a generated FSDP<Name> subclass, which
            # save_pretrained records as the architecture; from_pretrained needs the user's class.
            cfg = json.loads(config_file.read_text())
            base = next(c for c in type(inner).__mro__[1:] if not c.__name__.startswith("FSDP"))
            cfg["architectures"] = [base.__name__]
            config_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
    if on:
        dist.barrier()
    return out
