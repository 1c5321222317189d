"""The user's model, tokenizer, reference and critic for :class:`~rl2fx.trainer.ppo.PPOTrainer` (application layer).

``model`` is a ``torch.nn.Module`` or a local directory / Hugging Face hub id
loaded with ``from_pretrained``. A hub id is looked up in the local cache only
(``actor.local_files_only``, default true): without the files one line names
the id and how to supply it, at once (transformers' own loader would retry the
network for about 25 s first, even with ``local_files_only=True``).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch

from rl2fx.trainer.config import ConfigError
from rl2fx.trainer.tasks import CausalValueModel

__all__ = ["resolve_pretrained", "load_model", "load_tokenizer", "apply_peft", "is_peft_model", "frozen_copy",
           "build_critic"]


def _name(key: str) -> str:
    """A config key as the config errors name it; an argument name as it is."""
    return f"config key '{key}'" if "." in key else key


def resolve_pretrained(spec: str | os.PathLike[str], *, key: str, local_files_only: bool = True) -> str:
    """A local directory for ``spec`` (a directory, or a hub id in the local cache); else one
    :class:`ConfigError` naming ``key``, the value and how to supply it.

    With ``local_files_only=False`` a hub id is returned as given (``from_pretrained`` downloads it).

    >>> resolve_pretrained("no-such-org/no-such-model", key="model")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    rl2fx.trainer.config.ConfigError: model 'no-such-org/no-such-model' is neither a local directory nor in the Hugging Face cache (...); pass a local path, ...
    """
    text = os.fspath(spec)
    if Path(text).expanduser().is_dir():
        return str(Path(text).expanduser())
    if not local_files_only:
        return text
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return snapshot_download(text, local_files_only=True)
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError, OSError, ValueError):
        pass
    if text.startswith((".", "/", "~")) or text.count("/") > 1:  # a path, not an "org/name" id
        raise ConfigError(f"{_name(key)} {text!r}: no such directory") from None
    raise ConfigError(
        f"{_name(key)} {text!r} is neither a local directory nor in the Hugging Face cache ({constants.HF_HUB_CACHE}); "
        f"pass a local path, download it first (hf download {text}), or allow the network with "
        "actor.local_files_only=false") from None


def load_model(spec: Any, *, key: str = "model", local_files_only: bool = True) -> torch.nn.Module:
    """``spec`` itself if it is a module, else ``AutoModelForCausalLM.from_pretrained`` of its local directory."""
    if isinstance(spec, torch.nn.Module):
        return spec
    if not isinstance(spec, str | os.PathLike):
        raise ConfigError(f"{key} must be a torch.nn.Module, a local directory or a hub id, "
                          f"got {type(spec).__name__}")
    from transformers import AutoModelForCausalLM

    path = resolve_pretrained(spec, key=key, local_files_only=local_files_only)
    try:
        return AutoModelForCausalLM.from_pretrained(path, local_files_only=local_files_only)
    except (OSError, ValueError) as e:  # a directory without a loadable model
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{_name(key)} {os.fspath(spec)!r} cannot be loaded: {first}") from None


def load_tokenizer(tokenizer: Any, model_spec: Any, *, local_files_only: bool = True) -> Any:
    """The given tokenizer, else the one saved with the model's directory or hub id."""
    if tokenizer is not None and not isinstance(tokenizer, str | os.PathLike):
        return tokenizer
    spec = tokenizer if tokenizer is not None else model_spec
    key = "tokenizer" if tokenizer is not None else "model"
    if not isinstance(spec, str | os.PathLike):
        raise ConfigError("tokenizer is required when model is a torch.nn.Module (pass tokenizer=..., e.g. "
                          "AutoTokenizer.from_pretrained(<the model's directory>))")
    from transformers import AutoTokenizer

    path = resolve_pretrained(spec, key=key, local_files_only=local_files_only)
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=local_files_only)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{_name(key)} {os.fspath(spec)!r}: no tokenizer can be loaded from it ({first}); "
                          "pass tokenizer=...") from None


def is_peft_model(model: torch.nn.Module) -> bool:
    """Whether ``model`` carries PEFT adapters (``peft.PeftModel``)."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def apply_peft(model: torch.nn.Module, peft_config: Any) -> torch.nn.Module:
    """``peft.get_peft_model(model, peft_config)``: only the adapter weights train from here on."""
    try:
        from peft import PeftConfig, get_peft_model
    except ImportError:  # pragma: no cover - peft is a dependency
        raise ConfigError("peft_config needs the 'peft' package: pip install peft") from None
    if not isinstance(peft_config, PeftConfig):
        raise ConfigError(f"peft_config must be a peft.PeftConfig (e.g. peft.LoraConfig(r=8, "
                          f"target_modules='all-linear')), got {type(peft_config).__name__}")
    if is_peft_model(model):
        raise ConfigError("peft_config was given but model already has PEFT adapters: pass one or the other")
    return get_peft_model(model, peft_config)


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy in eval mode without gradients: the default reference model of a full fine-tune."""
    return copy.deepcopy(model).eval().requires_grad_(False)


def build_critic(policy: torch.nn.Module) -> CausalValueModel:
    """A value model on a copy of the policy's decoder body (its ``base_model``) with a zero scalar head,
    the critic layout of RL2 and OpenRLHF. For a PEFT policy the body is the adapter-free base."""
    inner: Any = policy.get_base_model() if is_peft_model(policy) else policy
    body = getattr(inner, "base_model", None)
    hidden = getattr(getattr(inner, "config", None), "hidden_size", None)
    if body is None or body is inner or hidden is None:
        raise ConfigError(f"cannot build a critic for {type(inner).__name__}: it has no decoder body "
                          "(base_model) and config.hidden_size; use a group estimator (adv.estimator=grpo, "
                          "rloo, ...) that needs no critic")
    body = copy.deepcopy(body).train().requires_grad_(True)
    return CausalValueModel(body, int(hidden))
