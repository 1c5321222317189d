"""MemoryOptimizer: checkpointing, CPU offload, mixed precision and batch-size search.

Each technique is a plain function here; :class:`MemoryOptimizer` holds one validated
:class:`MemoryConfig` and applies the functions the config switches on.

* Activation (gradient) checkpointing [Chen et al. 2016, "Training Deep Nets with
  Sublinear Memory Cost", arXiv:1604.06174]: keep only each block's input in the forward
  pass and recompute the block during backward. For a stack of $L$ blocks with $a$ bytes of
  saved activations each, peak activation memory drops from about $L a$ to
  $L \\cdot |x_\\text{in}| + a$, for about one extra forward pass (a step costs roughly
  $F + 2F$ without and $2F + 2F$ with it, so at most $\\approx 33\\%$ more time).
  Hugging Face models use their own switch (``activation_checkpointing_enable`` /
  ``gradient_checkpointing_enable``); any other ``nn.Module`` gets
  ``torch.utils.checkpoint.checkpoint(use_reentrant=False)`` around its repeated blocks.
* CPU offload [ZeRO-Offload, Ren et al. 2021, arXiv:2101.06840]: saved activations go to
  pinned host memory through ``torch.autograd.graph.save_on_cpu`` and optimizer state is
  parked on the host between steps. Only meaningful when the model lives on CUDA; on CPU
  it is a no-op whose reason is logged once.
* Mixed precision [Micikevicius et al. 2018, arXiv:1710.03740]: ``torch.autocast`` with
  bfloat16 where supported (float16 otherwise on CUDA, which then needs a GradScaler).
* Batch-size search: double the batch until it no longer fits, then bisect between the
  last fit and the first failure, the way accelerate's ``find_executable_batch_size``
  halves on OOM. "Fits" means no CUDA OOM and a measured peak within the memory budget;
  on CPU the peak is measured exactly by
  :class:`~rl2fx.memory.profiler.TensorMemoryTracker`.

>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3)])
>>> opt = MemoryOptimizer(enable_mixed_precision=False)
>>> model = opt.optimize_model_memory(model)
>>> opt.checkpoint_method
'torch'
>>> out = opt.memory_efficient_forward(model, torch.randn(4, 8))
>>> out.shape
torch.Size([4, 8])
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import psutil
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from rl2fx._typing import Tensor, check_range, typechecked
from rl2fx.memory.profiler import MemoryBudgetExceeded, TensorMemoryTracker

__all__ = [
    "MemoryConfig",
    "MemoryOptimizer",
    "autocast_dtype",
    "disable_checkpointing",
    "enable_checkpointing",
    "find_blocks",
    "find_executable_batch_size",
    "is_checkpointed",
    "is_oom_error",
    "make_batch",
    "model_device",
    "offload_activations",
    "offload_optimizer_state",
    "search_batch_size",
]

logger = logging.getLogger("rl2fx.memory")

Batch = Tensor | Mapping[str, Any] | Sequence[Any]

_CKPT_FLAG = "_rl2fx_checkpointed"


# --------------------------------------------------------------------------- config
@dataclass(frozen=True)
class MemoryConfig:
    """Validated settings of :class:`MemoryOptimizer` (the spec's ``memory_optimization``).

    ``memory_threshold``: the share of device memory training may use (the CUDA allocator
    cap inside :func:`~rl2fx.memory.context.memory_efficient_context` and the default
    batch-search budget). ``gc_threshold``: usage share above which garbage collection and
    ``torch.cuda.empty_cache`` run. ``0 < memory_threshold <= gc_threshold <= 1``.
    ``memory_budget_bytes``: explicit byte budget for one trial step in batch-size search
    (bytes the step allocates on top of what is already resident); ``None`` derives it
    from ``memory_threshold``.

    >>> MemoryConfig(memory_threshold=0.95, gc_threshold=0.9)
    Traceback (most recent call last):
    ...
    ValueError: memory_threshold must be in (0.0, 0.9], got 0.95 (it may not exceed gc_threshold=0.9)
    """

    enable_gradient_checkpointing: bool = True
    enable_activation_checkpointing: bool = True
    enable_cpu_offload: bool = True
    enable_mixed_precision: bool = True
    memory_threshold: float = 0.8
    gc_threshold: float = 0.9
    memory_budget_bytes: int | None = None
    mixed_precision_dtype: str | None = None

    def __post_init__(self) -> None:
        check_range("gc_threshold", self.gc_threshold, 0.0, 1.0, low_inclusive=False)
        try:
            check_range("memory_threshold", self.memory_threshold, 0.0, self.gc_threshold,
                        low_inclusive=False)
        except ValueError as e:
            raise ValueError(f"{e} (it may not exceed gc_threshold={self.gc_threshold})") from None
        if self.memory_budget_bytes is not None:
            check_range("memory_budget_bytes", self.memory_budget_bytes, 1, None)
        if self.mixed_precision_dtype is not None and self.mixed_precision_dtype not in (
            "bfloat16", "float16"
        ):
            raise ValueError(
                "mixed_precision_dtype must be one of ['bfloat16', 'float16', None], "
                f"got {self.mixed_precision_dtype!r}"
            )

    @property
    def checkpointing(self) -> bool:
        """Either spec flag turns checkpointing on; the method depends on the model."""
        return self.enable_gradient_checkpointing or self.enable_activation_checkpointing


# --------------------------------------------------------------------------- helpers
def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (or buffer); CPU for a stateless module."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def autocast_dtype(device_type: str, preferred: str | None = None) -> torch.dtype:
    """The autocast dtype for ``device_type``: bfloat16 where supported, else float16.

    >>> autocast_dtype("cpu")
    torch.bfloat16
    """
    if preferred is not None:
        return getattr(torch, preferred)
    if device_type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16


def is_oom_error(error: BaseException) -> bool:
    """True for CUDA/CPU out-of-memory errors and :class:`MemoryBudgetExceeded` (also wrapped).

    >>> is_oom_error(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    True
    >>> is_oom_error(ValueError("shape mismatch"))
    False
    """
    seen = 0
    e: BaseException | None = error
    while e is not None and seen < 8:
        if isinstance(e, MemoryBudgetExceeded | torch.OutOfMemoryError | MemoryError):
            return True
        if isinstance(e, RuntimeError):
            msg = str(e)
            if any(s in msg for s in ("out of memory", "can't allocate memory",
                                      "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_NOT_SUPPORTED.")):
                return True
        e = e.__cause__ or e.__context__
        seen += 1
    return False


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- checkpointing
def _has_hf_switch(model: nn.Module) -> bool:
    return bool(getattr(model, "supports_gradient_checkpointing", False)) and (
        hasattr(model, "activation_checkpointing_enable")
        or hasattr(model, "gradient_checkpointing_enable")
    )


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of ``model``: the ``ModuleList``/``Sequential`` with the most
    children of one type (ties: the most parameters), e.g. a transformer's layers.

    >>> from torch import nn
    >>> m = nn.Sequential(nn.Linear(2, 4), nn.ModuleList([nn.Linear(4, 4) for _ in range(3)]))
    >>> len(find_blocks(m))
    3
    """
    best: list[nn.Module] = []
    best_key = (1, -1)
    for module in model.modules():
        if not isinstance(module, nn.ModuleList | nn.Sequential):
            continue
        children = list(module.children())
        if len(children) < 2 or len({type(c) for c in children}) != 1:
            continue
        key = (len(children), sum(p.numel() for p in module.parameters()))
        if key > best_key:
            best, best_key = children, key
    return best


def _checkpointed_forward(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    forward = type(module).forward.__get__(module)
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    # Non-reentrant checkpointing supports keyword arguments, inputs that do not require
    # grad, and torch.autograd.grad; RNG state is restored so dropout replays identically.
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


@typechecked
def enable_checkpointing(
    model: nn.Module, *, blocks: Sequence[nn.Module] | None = None, prefer_transformers: bool = True
) -> str:
    """Turn on activation checkpointing; return the method used (``"transformers"`` or ``"torch"``).

    A Hugging Face ``PreTrainedModel`` that supports it uses its own switch (non-reentrant,
    and ``config.use_cache`` off, as caching conflicts with recomputation). Any other module
    gets each block in ``blocks`` (default :func:`find_blocks`) wrapped in
    ``torch.utils.checkpoint``: the block's ``forward`` is replaced on the instance, so
    parameter names and ``state_dict`` keys do not change. Idempotent.
    """
    if blocks is None and prefer_transformers and _has_hf_switch(model):
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:  # transformers < 5
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        config = getattr(model, "config", None)
        if config is not None and getattr(config, "use_cache", False):
            config.use_cache = False
        return "transformers"
    targets = list(blocks) if blocks is not None else find_blocks(model)
    if not targets:
        raise ValueError(
            f"enable_checkpointing found no repeated blocks in {type(model).__name__} "
            "(an nn.ModuleList or nn.Sequential of at least two modules of one type); "
            "pass blocks=[...] explicitly"
        )
    for block in targets:
        if not getattr(block, _CKPT_FLAG, False):
            block.forward = functools.partial(_checkpointed_forward, block)
            setattr(block, _CKPT_FLAG, True)
    return "torch"


def is_checkpointed(model: nn.Module) -> bool:
    """Whether any block of ``model`` is checkpointed (either method).

    >>> from torch import nn
    >>> m = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    >>> is_checkpointed(m), enable_checkpointing(m), is_checkpointed(m)
    (False, 'torch', True)
    """
    return any(getattr(m, _CKPT_FLAG, False) or getattr(m, "gradient_checkpointing", False) is True
               for m in model.modules())


def disable_checkpointing(model: nn.Module) -> None:
    """Undo :func:`enable_checkpointing` on ``model`` (both methods)."""
    for module in model.modules():
        if getattr(module, _CKPT_FLAG, False):
            del module.forward
            delattr(module, _CKPT_FLAG)
    if _has_hf_switch(model):
        if hasattr(model, "activation_checkpointing_disable"):
            model.activation_checkpointing_disable()
        else:
            model.gradient_checkpointing_disable()


# --------------------------------------------------------------------------- offload
def offload_activations(device: torch.device | str) -> contextlib.AbstractContextManager:
    """``save_on_cpu(pin_memory=True)`` when ``device`` is CUDA, else a null context.

    On CPU the saved activations already live in host memory; copying them would only
    double the memory, so nothing is done.
    """
    if torch.device(device).type == "cuda":
        return torch.autograd.graph.save_on_cpu(pin_memory=True)
    return contextlib.nullcontext()


@dataclass
class OptimizerOffloadHandle:
    """Hooks that keep a torch optimizer's state on the host between steps."""

    handles: list[Any] = field(default_factory=list)
    # (id(param), key) -> device the tensor lives on during step()
    placement: dict[tuple[int, str], torch.device] = field(default_factory=dict)

    def remove(self) -> None:
        """Remove the hooks (state stays where it is until the next step)."""
        for h in self.handles:
            h.remove()
        self.handles.clear()


def offload_optimizer_state(optimizer: torch.optim.Optimizer) -> OptimizerOffloadHandle | None:
    """Park ``optimizer``'s CUDA state tensors on the host between steps (ZeRO-Offload style).

    A step pre-hook moves each state tensor back to the device it had during ``step()``
    (Adam's ``exp_avg``/``exp_avg_sq`` to the GPU; its CPU ``step`` counter stays on the
    CPU), a post-hook moves the CUDA ones to the host. The update itself runs unchanged on
    the GPU, so results match the un-offloaded optimizer exactly. Returns ``None`` (and logs
    why) when no parameter is on CUDA.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not any(p.is_cuda for p in params):
        logger.info("optimizer state offload skipped: no parameter is on a CUDA device "
                    "(the state already lives in host memory)")
        return None
    handle = OptimizerOffloadHandle()

    def pre_hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for p, state in opt.state.items():
            for k, v in state.items():
                dev = handle.placement.get((id(p), k))
                if isinstance(v, Tensor) and dev is not None and v.device != dev:
                    state[k] = v.to(dev, non_blocking=True)

    def post_hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for p, state in opt.state.items():
            for k, v in state.items():
                if isinstance(v, Tensor) and v.is_cuda:
                    handle.placement[(id(p), k)] = v.device
                    # Blocking copy: the host copy is complete (and safe to read or save in a
                    # checkpoint) as soon as step() returns.
                    state[k] = v.to("cpu")

    handle.handles.append(optimizer.register_step_pre_hook(pre_hook))
    handle.handles.append(optimizer.register_step_post_hook(post_hook))
    return handle


# --------------------------------------------------------------------------- batches
@typechecked
def make_batch(sample_input: Batch, batch_size: int) -> Batch:
    """Tile ``sample_input`` (tensor, mapping or sequence of tensors sharing dim 0) to
    ``batch_size`` rows, cycling through its rows; non-tensor leaves are passed through.

    >>> import torch
    >>> make_batch(torch.tensor([[1, 2], [3, 4]]), 3).tolist()
    [[1, 2], [3, 4], [1, 2]]
    >>> make_batch({"input_ids": torch.zeros(1, 5, dtype=torch.long)}, 4)["input_ids"].shape
    torch.Size([4, 5])
    """
    check_range("batch_size", batch_size, 1, None)

    def tile(x: Any) -> Any:
        if isinstance(x, Tensor):
            if x.dim() == 0:
                return x
            idx = torch.arange(batch_size, device=x.device) % x.shape[0]
            return x.index_select(0, idx)
        return x

    if isinstance(sample_input, Tensor):
        return tile(sample_input)
    if isinstance(sample_input, Mapping):
        return {k: tile(v) for k, v in sample_input.items()}
    return type(sample_input)(tile(v) for v in sample_input)


def _call(model: nn.Module, inputs: Batch) -> Any:
    if isinstance(inputs, Tensor):
        return model(inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(*inputs)


def _scalar_loss(output: Any) -> Tensor:
    """A scalar to backpropagate from a model output (HF ``ModelOutput``, tensor or tuple)."""
    loss = getattr(output, "loss", None)
    if isinstance(loss, Tensor):
        return loss
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits.float().mean()
    if isinstance(output, Tensor):
        return output.float().mean()
    if isinstance(output, Sequence) and output and isinstance(output[0], Tensor):
        return output[0].float().mean()
    raise TypeError(f"cannot derive a scalar loss from a {type(output).__name__}; pass step_fn=")


@dataclass(frozen=True)
class BatchTrial:
    """One trial of the batch-size search."""

    batch_size: int
    fits: bool
    peak_bytes: int | None
    reason: str


def search_batch_size(
    fits: Callable[[int], BatchTrial], *, min_batch_size: int = 1, max_batch_size: int = 1024
) -> tuple[int, list[BatchTrial]]:
    """Largest ``b`` in ``[min_batch_size, max_batch_size]`` with ``fits(b).fits``: doubling
    from ``min_batch_size`` until a failure, then bisection. Assumes fitting is monotone
    (a batch fits if a larger one does). Raises ``RuntimeError`` if ``min_batch_size`` fails.

    >>> trial = lambda b: BatchTrial(b, b * 100 <= 2300, b * 100, "simulated")
    >>> search_batch_size(trial, max_batch_size=64)[0]
    23
    """
    check_range("min_batch_size", min_batch_size, 1, None)
    check_range("max_batch_size", max_batch_size, min_batch_size, None)
    trials: list[BatchTrial] = []

    def run(b: int) -> bool:
        t = fits(b)
        trials.append(t)
        return t.fits

    if not run(min_batch_size):
        raise RuntimeError(
            f"even min_batch_size={min_batch_size} does not fit: {trials[-1].reason}"
        )
    lo, hi = min_batch_size, None
    while hi is None:
        nxt = min(lo * 2, max_batch_size)
        if nxt == lo:
            return lo, trials
        if run(nxt):
            lo = nxt
        else:
            hi = nxt
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if run(mid):
            lo = mid
        else:
            hi = mid
    return lo, trials


def find_executable_batch_size(
    function: Callable[..., Any] | None = None,
    *,
    starting_batch_size: int = 128,
    memory_budget_bytes: int | None = None,
) -> Callable[..., Any]:
    """Decorator: call ``function(batch_size, *args, **kwargs)``, halving ``batch_size`` on
    out-of-memory until it runs (after accelerate's ``find_executable_batch_size``).

    With ``memory_budget_bytes`` the call runs under a
    :class:`~rl2fx.memory.profiler.TensorMemoryTracker` whose limit acts as an OOM, so the
    same code exercises the retry path on a CPU. The batch size that ran is stored on the
    wrapper as ``.batch_size``.

    >>> import torch
    >>> @find_executable_batch_size(starting_batch_size=64, memory_budget_bytes=40_000)
    ... def step(batch_size):
    ...     return torch.ones(batch_size, 256).sum().item()   # 1 KiB per row
    >>> step(), step.batch_size
    (8192.0, 32)
    """
    check_range("starting_batch_size", starting_batch_size, 1, None)
    if memory_budget_bytes is not None:
        check_range("memory_budget_bytes", memory_budget_bytes, 1, None)

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            batch_size = starting_batch_size
            while batch_size >= 1:
                tracker = TensorMemoryTracker(limit_bytes=memory_budget_bytes)
                try:
                    ctx = tracker if memory_budget_bytes is not None else contextlib.nullcontext()
                    with ctx:
                        result = fn(batch_size, *args, **kwargs)
                    wrapper.batch_size = batch_size  # type: ignore[attr-defined]
                    return result
                except Exception as e:
                    if not (tracker.exceeded or is_oom_error(e)):
                        raise
                    logger.info("batch size %d ran out of memory (%s); retrying with %d",
                                batch_size, type(e).__name__, batch_size // 2)
                    _free_memory()
                    batch_size //= 2
            raise RuntimeError("no executable batch size found: batch size 1 ran out of memory")

        wrapper.batch_size = None  # type: ignore[attr-defined]
        return wrapper

    return decorate(function) if function is not None else decorate


# --------------------------------------------------------------------------- optimizer
class MemoryOptimizer:
    """The spec's memory optimizer: holds one :class:`MemoryConfig` and applies it.

    Args mirror the spec's ``memory_optimization`` section; see :class:`MemoryConfig`.

    >>> MemoryOptimizer(memory_threshold=0.0)
    Traceback (most recent call last):
    ...
    ValueError: memory_threshold must be in (0.0, 0.9], got 0.0 (it may not exceed gc_threshold=0.9)
    """

    def __init__(
        self,
        enable_gradient_checkpointing: bool = True,
        enable_activation_checkpointing: bool = True,
        enable_cpu_offload: bool = True,
        enable_mixed_precision: bool = True,
        memory_threshold: float = 0.8,
        gc_threshold: float = 0.9,
        *,
        memory_budget_bytes: int | None = None,
        mixed_precision_dtype: str | None = None,
    ) -> None:
        self.config = MemoryConfig(
            enable_gradient_checkpointing=enable_gradient_checkpointing,
            enable_activation_checkpointing=enable_activation_checkpointing,
            enable_cpu_offload=enable_cpu_offload,
            enable_mixed_precision=enable_mixed_precision,
            memory_threshold=memory_threshold,
            gc_threshold=gc_threshold,
            memory_budget_bytes=memory_budget_bytes,
            mixed_precision_dtype=mixed_precision_dtype,
        )
        self.checkpoint_method: str | None = None
        self.last_batch_size: int | None = None
        self.last_trials: list[BatchTrial] = []
        self.notes: list[str] = []

    _SECTIONS = ("enabled", "profiling", "adaptive_batch_sizing")

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> MemoryOptimizer:
        """Build from the spec's ``memory_optimization`` section (a dict or OmegaConf node).

        ``enabled: false`` turns every technique off; the ``profiling`` and
        ``adaptive_batch_sizing`` subsections belong to :class:`MemoryProfiler` and
        ``AdaptiveBatchSizer`` and are ignored here. Unknown keys raise ``ValueError``.

        >>> MemoryOptimizer.from_config({"enabled": True, "memory_threshold": 0.7}).memory_threshold
        0.7
        """
        fields = set(MemoryConfig.__dataclass_fields__)
        unknown = sorted(set(section) - fields - set(cls._SECTIONS))
        if unknown:
            raise ValueError(f"memory_optimization has unknown keys {unknown}; allowed: "
                             f"{sorted(fields | set(cls._SECTIONS))}")
        kwargs = {k: section[k] for k in section if k in fields}
        if not section.get("enabled", True):
            for k in fields:
                if k.startswith("enable_"):
                    kwargs[k] = False
        return cls(**kwargs)

    def __getattr__(self, name: str) -> Any:
        # Expose config fields (optimizer.memory_threshold, ...) read-only.
        config = self.__dict__.get("config")
        if config is not None and name in MemoryConfig.__dataclass_fields__:
            return getattr(config, name)
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

    def _note(self, message: str) -> None:
        if message not in self.notes:
            self.notes.append(message)
            logger.info(message)

    # -- model ----------------------------------------------------------------
    def optimize_model_memory(self, model: nn.Module) -> nn.Module:
        """Apply checkpointing (and note the offload decision); return the same model."""
        if self.config.checkpointing:
            try:
                self.checkpoint_method = enable_checkpointing(model)
            except ValueError as e:
                # Nothing to checkpoint (a model without repeated blocks) is not an error
                # for the spec-level switch; it is reported, not hidden.
                self.checkpoint_method = "none"
                self._note(f"activation checkpointing skipped: {e}")
                logger.warning("activation checkpointing skipped: %s", e)
            else:
                self._note(f"activation checkpointing on via {self.checkpoint_method}")
        if self.config.enable_cpu_offload and model_device(model).type != "cuda":
            self._note("cpu offload skipped: the model is not on a CUDA device, activations "
                       "and optimizer state already live in host memory")
        return model

    def offload_optimizer_state(self, optimizer: torch.optim.Optimizer) -> OptimizerOffloadHandle | None:
        """Keep ``optimizer``'s state on the host between steps when offload is on and CUDA is used."""
        if not self.config.enable_cpu_offload:
            return None
        handle = offload_optimizer_state(optimizer)
        if handle is None:
            self._note("optimizer state offload skipped: no parameter on a CUDA device")
        return handle

    @contextlib.contextmanager
    def forward_context(self, device: torch.device | str) -> Iterator[None]:
        """Autocast (if mixed precision is on) and activation offload (if on and CUDA)."""
        device = torch.device(device)
        with contextlib.ExitStack() as stack:
            if self.config.enable_mixed_precision:
                dtype = autocast_dtype(device.type, self.config.mixed_precision_dtype)
                stack.enter_context(torch.autocast(device_type=device.type, dtype=dtype))
            if self.config.enable_cpu_offload:
                if device.type == "cuda":
                    stack.enter_context(offload_activations(device))
                else:
                    self._note("activation offload skipped: not on a CUDA device")
            yield

    def memory_efficient_forward(self, model: nn.Module, inputs: Batch) -> Any:
        """``model(inputs)`` under autocast (bf16 where supported) with checkpointing on.

        ``inputs``: a tensor (``model(x)``), a mapping (``model(**x)``) or a sequence
        (``model(*x)``). Checkpointing is switched on first if the config asks for it and
        :meth:`optimize_model_memory` has not run.
        """
        if self.config.checkpointing and not is_checkpointed(model):
            self.optimize_model_memory(model)
        with self.forward_context(model_device(model)):
            return _call(model, inputs)

    # -- batch size -----------------------------------------------------------
    def memory_budget(self, device: torch.device | str) -> int:
        """Bytes one trial step may allocate: ``memory_budget_bytes`` if set, else
        ``memory_threshold`` x (CUDA total - already allocated, or host available memory)."""
        if self.config.memory_budget_bytes is not None:
            return self.config.memory_budget_bytes
        device = torch.device(device)
        if device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
            return int(self.config.memory_threshold * total) - torch.cuda.memory_allocated(device)
        return int(self.config.memory_threshold * psutil.virtual_memory().available)

    def _trial(self, model: nn.Module, sample_input: Batch, batch_size: int, budget: int,
               step_fn: Callable[[nn.Module, Batch], Any] | None) -> BatchTrial:
        device = model_device(model)
        saved_grads = [(p, p.grad) for p in model.parameters()]
        for p, _ in saved_grads:
            p.grad = None
        use_cuda = device.type == "cuda"
        # On CUDA the allocator's own peak counter is exact and free; elsewhere the tracker.
        tracker = TensorMemoryTracker(limit_bytes=None if use_cuda else budget)
        base = 0
        batch: Batch | None = None
        failed = False
        try:
            if use_cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            # The tiled batch counts: it is memory the step needs.
            with contextlib.nullcontext() if use_cuda else tracker:
                batch = make_batch(sample_input, batch_size)
                if step_fn is not None:
                    step_fn(model, batch)
                else:
                    _scalar_loss(self.memory_efficient_forward(model, batch)).backward()
            if use_cuda:
                torch.cuda.synchronize(device)
                peak = torch.cuda.max_memory_allocated(device) - base
            else:
                peak = tracker.peak_bytes
            ok = peak <= budget
            return BatchTrial(batch_size, ok, peak, f"peak {peak} bytes vs budget {budget}")
        except Exception as e:
            if not (tracker.exceeded or is_oom_error(e)):
                raise
            failed = True
            return BatchTrial(batch_size, False, None, f"{type(e).__name__}: {str(e)[:200]}")
        finally:
            for p, g in saved_grads:
                p.grad = g
            del batch
            # Only after an OOM: the traceback's frames held tensors, and the CUDA cache is
            # fragmented (a full gc.collect per trial would cost more than small trials).
            if failed:
                _free_memory()

    def optimize_batch_size(
        self,
        model: nn.Module,
        sample_input: Batch,
        *,
        min_batch_size: int = 1,
        max_batch_size: int = 1024,
        step_fn: Callable[[nn.Module, Batch], Any] | None = None,
    ) -> int:
        """Largest batch size whose forward+backward fits the memory budget.

        Each trial tiles ``sample_input`` to the batch size (:func:`make_batch`) and runs
        ``step_fn(model, batch)`` (default: :meth:`memory_efficient_forward` and backward of
        the mean logit), restoring the model's gradients afterwards. A trial fails on CUDA
        OOM or when its peak passes :meth:`memory_budget`; see :func:`search_batch_size`.
        The trials are kept in ``last_trials``.
        """
        budget = self.memory_budget(model_device(model))
        best, trials = search_batch_size(
            lambda b: self._trial(model, sample_input, b, budget, step_fn),
            min_batch_size=min_batch_size,
            max_batch_size=max_batch_size,
        )
        self.last_batch_size, self.last_trials = best, trials
        return best

    # -- state ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Config and the last batch-size search result."""
        return {"config": asdict(self.config), "last_batch_size": self.last_batch_size}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (config re-validated)."""
        self.config = replace(self.config, **dict(state["config"]))
        self.last_batch_size = state.get("last_batch_size")

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in asdict(self.config).items())
        return f"MemoryOptimizer({fields})"


__all__ += ["BatchTrial", "OptimizerOffloadHandle"]
