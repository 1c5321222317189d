"""Environments for multi-turn rollouts: RL2's ``env_step`` protocol, loading, validation, batched stepping.

An environment is a Python file (``load_env("path/to/env.py")``, RL2's
``rollout.env_path``) or any object or module with a function

.. code-block:: python

    def env_step(sample) -> {"next_state": str | None, "done": bool, "reward": float}

plain or ``async def``. ``sample`` carries RL2's field names, so an RL2
environment file that reads only them runs unchanged:

- ``sample.sample``: the dataset row (a dict: the prompt and any other columns);
- ``sample.action_text``: the model's latest response, decoded without special tokens;
- ``sample.state_text``: the text before that response (the prompt, then each
  turn's response and the environment's text);
- ``sample.turn``: how many responses the model has given so far (1 at the first ``env_step``).

``next_state`` is the whole text the model sees next. When it extends
``state_text + action_text`` only the extension is tokenised and appended (with
``action_mask`` 0); otherwise the trajectory continues in a fresh segment that
starts from ``next_state`` (RL2's ``add_env_response``). ``reward`` is this
turn's reward; ``done`` ends the trajectory (``next_state`` may then be ``None``).

Tools are environments too: :mod:`rl2fx.tools.calculator` parses a tool call in
the response, runs it and appends its result as the next state.

What is checked (:func:`check_env_response`): the keys are exactly the three
above, ``done`` is a bool, ``reward`` a finite real number, ``next_state`` text
or ``None`` (text when not done). A malformed response raises
:class:`EnvError` naming the environment and the sample. An environment that
*raises* fails only its sample (:func:`step_env` returns the exception in its
place); :func:`rl2fx.multiturn.multi_turn_rollout` counts and logs it.

>>> def env_step(sample):
...     return {"next_state": None, "done": True, "reward": float(sample.action_text == "4")}
>>> env = load_env(env_step)
>>> step_env(env, [EnvSample(sample={"prompt": "2+2="}, state_text="2+2=", action_text="4", turn=1)])
[{'next_state': None, 'done': True, 'reward': 1.0}]
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import inspect
import math
import os
import types
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypedDict, runtime_checkable

__all__ = ["EnvError", "EnvSample", "Sample", "EnvResponse", "Environment", "LoadedEnv", "ENV_RESPONSE_KEYS", "load_env",
           "check_env_response", "step_env"]

#: The keys of an ``env_step`` result, exactly these.
ENV_RESPONSE_KEYS = ("next_state", "done", "reward")


class EnvError(ValueError):
    """An environment returned something the protocol does not allow, or could not be loaded."""


class EnvResponse(TypedDict):
    """A checked ``env_step`` result."""

    next_state: str | None
    done: bool
    reward: float


@dataclass
class EnvSample:
    """What ``env_step`` receives: RL2's ``Sample`` fields ``sample``, ``state_text``, ``action_text``, ``turn``.

    ``index`` is the trajectory's row in the rollout (``prompt index * G + response index``).
    An environment may keep its own per-trajectory data in ``extra`` (the object is
    the same at every turn of one trajectory).
    """

    sample: dict[str, Any]
    state_text: str = ""
    action_text: str = ""
    turn: int = 0
    index: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


#: RL2's name for :class:`EnvSample` (``from RL2.datasets import Sample`` becomes ``from rl2fx.envs import Sample``).
Sample = EnvSample


@runtime_checkable
class Environment(Protocol):
    """Anything with an ``env_step(sample)`` method or function (sync or async)."""

    def env_step(self, sample: EnvSample) -> Any: ...  # pragma: no cover


@dataclass(frozen=True)
class LoadedEnv:
    """A resolved environment: its ``env_step`` callable, whether it is a coroutine function, and a name for errors."""

    step: Callable[[EnvSample], Any]
    is_async: bool
    name: str


def _import_file(path: Path) -> types.ModuleType:
    # a private module name per file: nothing is added to sys.path or sys.modules
    spec = importlib.util.spec_from_file_location(f"rl2fx_env_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise EnvError(f"environment {str(path)!r} cannot be imported as a Python module (expected a .py file)")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_env(env: str | os.PathLike[str] | Any) -> LoadedEnv:
    """Resolve ``env``: a path to a ``.py`` file, or an object/module with ``env_step``, or an ``env_step`` callable.

    A file is imported with :mod:`importlib.util` (RL2's way: no ``sys.path``
    change). Its ``env_step`` may be ``async def``.

    >>> load_env("no/such/env.py")
    Traceback (most recent call last):
    ...
    rl2fx.envs.EnvError: environment 'no/such/env.py' does not exist (rollout.env_path must be a .py file ...)
    """
    if isinstance(env, LoadedEnv):
        return env
    if isinstance(env, (str, os.PathLike)):
        path = Path(env)
        if not path.is_file():
            raise EnvError(f"environment {str(env)!r} does not exist (rollout.env_path must be a .py file "
                           f"defining env_step(sample))")
        if path.suffix != ".py":
            raise EnvError(f"environment {str(env)!r} is not a .py file")
        obj: Any = _import_file(path)
        name = str(env)
    else:
        obj = env
        name = getattr(env, "__name__", None) or type(env).__name__
    if callable(obj) and not isinstance(obj, types.ModuleType) and not hasattr(obj, "env_step"):
        step = obj
    else:
        step = getattr(obj, "env_step", None)
        if step is None:
            raise EnvError(f"environment {name!r} has no env_step; define env_step(sample) -> "
                           f"{{'next_state': str | None, 'done': bool, 'reward': float}} (sync or async)")
        if not callable(step):
            raise EnvError(f"environment {name!r}: env_step is {type(step).__name__}, not a function")
    return LoadedEnv(step=step, is_async=inspect.iscoroutinefunction(step), name=name)


def check_env_response(response: Any, *, env: str, index: int) -> EnvResponse:
    """``response`` as an :class:`EnvResponse`, or :class:`EnvError` naming ``env`` and the sample ``index``.

    >>> check_env_response({"next_state": None, "done": True, "reward": 1}, env="e", index=0)
    {'next_state': None, 'done': True, 'reward': 1.0}
    >>> check_env_response({"next_state": None, "done": True, "reward": float("nan")}, env="e", index=3)
    Traceback (most recent call last):
    ...
    rl2fx.envs.EnvError: environment 'e', sample 3: reward must be a finite number, got nan
    """
    where = f"environment {env!r}, sample {index}"
    if not isinstance(response, dict):
        raise EnvError(f"{where}: env_step must return a dict with keys {list(ENV_RESPONSE_KEYS)}, "
                       f"got {type(response).__name__}")
    missing = [k for k in ENV_RESPONSE_KEYS if k not in response]
    extra = sorted(str(k) for k in response if k not in ENV_RESPONSE_KEYS)
    if missing or extra:
        raise EnvError(f"{where}: env_step returned keys {sorted(map(str, response))}; missing {missing}, "
                       f"unexpected {extra} (allowed: {list(ENV_RESPONSE_KEYS)})")
    done, reward, nxt = response["done"], response["reward"], response["next_state"]
    if not isinstance(done, bool) and type(done).__name__ != "bool_":  # numpy.bool_ too
        raise EnvError(f"{where}: done must be a bool, got {type(done).__name__} ({done!r})")
    if isinstance(reward, bool) or not isinstance(reward, (int, float)) and not hasattr(reward, "__float__"):
        raise EnvError(f"{where}: reward must be a real number, got {type(reward).__name__} ({reward!r})")
    try:
        r = float(reward)
    except (TypeError, ValueError) as e:
        raise EnvError(f"{where}: reward must be a real number, got {reward!r}") from e
    if not math.isfinite(r):
        raise EnvError(f"{where}: reward must be a finite number, got {r}")
    if nxt is not None and not isinstance(nxt, str):
        raise EnvError(f"{where}: next_state must be str or None, got {type(nxt).__name__}")
    if nxt is None and not bool(done):
        raise EnvError(f"{where}: next_state is None but done is False; return the next text or done=True")
    return {"next_state": nxt, "done": bool(done), "reward": r}


async def _gather(env: LoadedEnv, samples: Sequence[EnvSample]) -> list[Any]:
    async def one(s: EnvSample) -> Any:
        out = env.step(s)
        return await out if inspect.isawaitable(out) else out

    return list(await asyncio.gather(*(one(s) for s in samples), return_exceptions=True))


def _run(coro_fn: Callable[[], Awaitable[list[Any]]]) -> list[Any]:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro_fn())  # type: ignore[arg-type]
    # inside a running loop (a notebook): asyncio.run would refuse, so run on a private loop in a thread
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro_fn()).result()  # type: ignore[arg-type]


def step_env(env: LoadedEnv | Any, samples: Sequence[EnvSample]) -> list[EnvResponse | Exception]:
    """One ``env_step`` per sample: concurrently (``asyncio.gather``) for an async environment, in order otherwise.

    Returns, per sample, the checked response or the exception ``env_step`` raised
    (an environment that raises fails its sample only). A malformed response is
    not an environment failure but a protocol error: it raises :class:`EnvError`.
    """
    loaded = load_env(env)
    results: list[Any]
    if loaded.is_async:
        results = _run(lambda: _gather(loaded, samples))
    else:
        results = []
        for s in samples:
            try:
                out = loaded.step(s)
                if inspect.isawaitable(out):  # a plain function returning a coroutine
                    out = _run(lambda out=out: _await(out))
                results.append(out)
            except Exception as e:  # noqa: BLE001 - the sample fails, the caller counts and logs it
                results.append(e)
    checked: list[EnvResponse | Exception] = []
    for s, r in zip(samples, results, strict=True):
        if isinstance(r, BaseException):
            if not isinstance(r, Exception):  # KeyboardInterrupt, SystemExit, CancelledError
                raise r
            checked.append(r)
        else:
            checked.append(check_env_response(r, env=loaded.name, index=s.index))
    return checked


async def _await(x: Awaitable[Any]) -> Any:
    return await x
