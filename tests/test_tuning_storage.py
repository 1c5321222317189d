"""Shared study storage: concurrent workers keep every trial once; dead workers' trials run again.

The concurrency tests start real processes that ask and tell on one study at once, for
both backends: a directory (file locks,
append-only logs) and a SQLite database. Before this storage layer, two processes on
one directory kept 10 of 20 trials and evaluated the same grid points twice.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest

from rl2fx import HyperparameterConfig, Study
from rl2fx.tuning.samplers import GridSampler, RandomSampler, StudyExhausted
from rl2fx.tuning.storage import DatabaseStorage, DirectoryStorage, StorageError, open_storage

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
GRID = [HyperparameterConfig("a", "int", low=0, high=9), HyperparameterConfig("b", "int", low=0, high=9)]
SPACE = [HyperparameterConfig("x", "float", low=-1.0, high=1.0)]

def _worker(kind: str, target: str, n: int, go, results) -> None:
    """One worker process: waits for ``go``, then asks/tells ``n`` trials on a grid study and
    on a random study (no seed given: every worker must adopt the seed the first one stored)."""

    def storage(name: str):
        if kind == "db":
            # heartbeats on (the thread runs beside the asks), with a grace no CPU starvation reaches
            return DatabaseStorage(target, study_name=name, heartbeat_interval=30.0)
        return os.path.join(target, name)

    go.wait()
    studies = {"grid": Study(GRID, GridSampler(grid_size=10), maximize=False, storage=storage("grid")),
               "random": Study(SPACE, "random", maximize=False, storage=storage("random"))}
    out: dict[str, list] = {k: [] for k in studies}
    for _ in range(n):
        for name, s in studies.items():
            t = s.ask()
            time.sleep(0.005)  # "training": other workers ask meanwhile, so running trials overlap
            s.tell(t, float(sum(v for v in t.params.values())))
            out[name].append([t.number, t.params])
    for s in studies.values():
        s.storage.close()
    results.put(out)


def _storage(kind: str, where: Path, name: str):
    if kind == "db":
        return DatabaseStorage(f"sqlite:///{where}", study_name=name, heartbeat_interval=None)
    return where / name


def _run_workers(kind: str, tmp_path: Path, n_workers: int, n_trials: int,
                 method: str = "fork") -> tuple[list[dict], Path, float]:
    # fork: the workers start in milliseconds (a fresh interpreter spends ~2 s of CPU importing
    # torch) and share nothing but the storage; the spawn variant and the killed-worker tests
    # below use fresh interpreters
    ctx = mp.get_context(method)
    where = tmp_path / "study.db" if kind == "db" else tmp_path / "studies"
    target = f"sqlite:///{where}" if kind == "db" else str(where)
    go, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(kind, target, n_trials, go, results)) for _ in range(n_workers)]
    for p in procs:
        p.start()
    t0 = time.perf_counter()
    go.set()
    outs = [results.get(timeout=120) for _ in procs]
    seconds = time.perf_counter() - t0
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    return outs, where, seconds


@pytest.mark.parametrize("kind", ["dir", "db"])
@pytest.mark.parametrize("n_workers", [2, 4])
def test_concurrent_workers_keep_every_trial_exactly_once(tmp_path, kind, n_workers):
    n = 10
    outs, where, _ = _run_workers(kind, tmp_path, n_workers, n)
    total = n_workers * n
    for name in ("grid", "random"):
        told = [tuple(x[0] for x in o[name]) for o in outs]
        numbers = [k for nums in told for k in nums]
        assert sorted(numbers) == list(range(total))  # unique numbers, none skipped
        if name == "grid":
            study = Study(GRID, GridSampler(grid_size=10), maximize=False, storage=_storage(kind, where, name))
        else:
            study = Study(SPACE, "random", maximize=False, storage=_storage(kind, where, name))
        trials = study.trials
        assert len(trials) == total and all(t.state == "complete" for t in trials)
        assert sorted(t.number for t in trials) == list(range(total))
        assert not study.pending
        keys = [tuple(sorted(t.params.items())) for t in trials]
        assert len(set(keys)) == total  # no parameter set evaluated twice
        if name == "grid":
            assert sorted(t.info["grid_index"] for t in trials) == list(range(total))
        else:  # every worker sampled with the one seed stored by the first
            ref = RandomSampler(seed=study.sampler.seed)
            assert all(t.params == ref.sample(SPACE, [], [], t.number, False)[0] for t in trials)
        if kind == "db":
            study.storage.close()


@pytest.mark.slow  # four fresh interpreters: ~20-30 s on a busy 2-core machine
@pytest.mark.parametrize("kind", ["dir", "db"])
def test_concurrent_fresh_interpreters_keep_every_trial_exactly_once(tmp_path, kind):
    outs, where, _ = _run_workers(kind, tmp_path, 4, 10, method="spawn")
    for name in ("grid", "random"):
        assert sorted(x[0] for o in outs for x in o[name]) == list(range(40))
        assert len({json.dumps(x[1], sort_keys=True) for o in outs for x in o[name]}) == 40


def _victim(kind: str, target: str, ready: Path) -> subprocess.Popen:
    code = textwrap.dedent(
        """
        import json, sys, time
        from rl2fx import HyperparameterConfig, Study
        from rl2fx.tuning.samplers import GridSampler
        from rl2fx.tuning.storage import DatabaseStorage
        kind, target, ready = sys.argv[1:4]
        grid = [HyperparameterConfig("a", "int", low=0, high=9), HyperparameterConfig("b", "int", low=0, high=9)]
        st = DatabaseStorage(target, heartbeat_interval=0.2, grace_period=1.0) if kind == "db" else target
        s = Study(grid, GridSampler(grid_size=10), maximize=False, storage=st)
        t = s.ask()
        with open(ready + ".tmp", "w") as f:
            json.dump({"number": t.number, "params": t.params}, f)
        import os; os.replace(ready + ".tmp", ready)
        time.sleep(600)  # "training": killed here
        """
    )
    return subprocess.Popen([sys.executable, "-c", code, kind, target, str(ready)], env=ENV)


def _kill_after_ask(proc: subprocess.Popen, ready: Path) -> dict:
    deadline = time.time() + 120
    try:
        while not ready.exists():
            assert proc.poll() is None, "the worker exited before asking"
            assert time.time() < deadline, "the worker asked no trial in time"
            time.sleep(0.02)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    return json.loads(ready.read_text())


def _run_to_exhaustion(study: Study, poll: float = 0.1, timeout: float = 60.0) -> list:
    """Ask/tell until the grid is exhausted and no other worker's trial is still running."""
    mine = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            t = study.ask()
        except StudyExhausted:
            if study.refresh().pending:  # a trial still running elsewhere may yet be requeued
                time.sleep(poll)
                continue
            return mine
        study.tell(t, float(t.params["a"] + t.params["b"]))
        mine.append(t)
    raise AssertionError("the study did not finish in time")


def test_killed_worker_trial_is_failed_requeued_and_run_by_another_worker_db(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    ready = tmp_path / "asked.json"
    victim = _kill_after_ask(_victim("db", url, ready), ready)
    st = DatabaseStorage(url, heartbeat_interval=0.2, grace_period=1.0)
    study = Study(GRID, GridSampler(grid_size=10), maximize=False, storage=st)
    mine = _run_to_exhaustion(study)
    st.close()
    trials = Study(GRID, GridSampler(grid_size=10), maximize=False,
                   storage=DatabaseStorage(url, heartbeat_interval=None)).trials
    dead = next(t for t in trials if t.number == victim["number"])
    assert dead.state == "failed" and dead.error.startswith("stale heartbeat: worker died")
    retry = [t for t in trials if t.info.get("retry_of") == victim["number"]]
    assert len(retry) == 1 and retry[0].state == "complete" and retry[0].params == victim["params"]
    assert retry[0] in mine or any(t.number == retry[0].number for t in mine)  # run by the other worker
    done = [t for t in trials if t.state == "complete"]
    assert sorted(t.info["grid_index"] for t in done) == list(range(100))  # every point once
    assert len({tuple(sorted(t.params.items())) for t in done}) == 100


def test_killed_worker_trial_is_run_again_directory(tmp_path):
    ready = tmp_path / "asked.json"
    where = tmp_path / "study"
    victim = _kill_after_ask(_victim("dir", str(where), ready), ready)
    study = Study(GRID, GridSampler(grid_size=10), maximize=False, storage=where)
    t = study.ask()  # the dead worker's trial comes back first, with its number and parameters
    assert (t.number, t.params) == (victim["number"], victim["params"])
    study.tell(t, 0.0)
    _run_to_exhaustion(study)
    trials = Study(GRID, GridSampler(grid_size=10), maximize=False, storage=where).trials
    assert sorted(t.number for t in trials) == list(range(100))
    assert all(t.state == "complete" for t in trials)
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 100


# -- one process -----------------------------------------------------------------------------------


def test_directory_written_by_the_previous_format_resumes(tmp_path):
    """A study directory as the earlier rl2fx wrote it (study.json + trials.jsonl rewritten
    atomically, no asks.jsonl, maybe a stale temp file) resumes and keeps its trials."""
    meta = {
        "format": 1,
        "param_configs": [c.to_dict() for c in SPACE],
        "maximize": False,
        "sampler": {"name": "random", "settings": {"seed": 11}},
    }
    (tmp_path / "study.json").write_text(json.dumps(meta, indent=2))
    old = [
        {"number": 0, "params": {"x": 0.5}, "state": "complete", "value": 0.25, "error": None, "metrics": {},
         "info": {}, "started_at": 1.0, "finished_at": 2.0, "values": None, "intermediate": {}},
        {"number": 1, "params": {"x": -0.5}, "state": "failed", "value": float("nan"),
         "error": "objective value is not finite: nan", "metrics": {}, "info": {}, "started_at": 2.0,
         "finished_at": 3.0, "values": None, "intermediate": {}},
    ]
    (tmp_path / "trials.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    (tmp_path / ".trials.jsonl.abc.tmp").write_text('{"number": 99, "par')
    s = Study(SPACE, "random", maximize=False, storage=tmp_path)
    assert s.sampler.seed == 11 and [t.number for t in s.trials] == [0, 1]
    assert math.isnan(s.trials[1].value) and not list(tmp_path.glob(".*.tmp"))
    t = s.ask()
    assert t.number == 2 and t.params == RandomSampler(seed=11).sample(SPACE, [], [], 2, False)[0]
    s.tell(t, 0.1)
    lines = (tmp_path / "trials.jsonl").read_text().splitlines()
    assert [json.loads(ln)["number"] for ln in lines] == [0, 1, 2]  # the old lines kept as they were
    assert json.loads(lines[0]) == old[0]


def test_study_json_missing_keys(tmp_path):
    s = Study(SPACE, "random", storage=tmp_path, seed=1)
    s.tell(s.ask(), 1.0)
    meta = json.loads((tmp_path / "study.json").read_text())
    del meta["format"]  # added later: defaults to 1
    (tmp_path / "study.json").write_text(json.dumps(meta))
    assert len(Study(SPACE, "random", storage=tmp_path).trials) == 1
    for key in ("param_configs", "maximize", "sampler"):
        bad = {k: v for k, v in meta.items() if k != key}
        (tmp_path / "study.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=rf"study file '{tmp_path}/study.json' has no key '{key}'"):
            Study(SPACE, "random", storage=tmp_path)
    bad = {**meta, "sampler": {"name": "random"}}
    (tmp_path / "study.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"has no key 'sampler.settings'"):
        Study(SPACE, "random", storage=tmp_path)


def test_torn_and_corrupt_log_lines(tmp_path):
    s = Study(SPACE, "random", storage=tmp_path, seed=1)
    for _ in range(2):
        s.tell(s.ask(), 1.0)
    s.storage.close()
    with open(tmp_path / "trials.jsonl", "a") as f:  # a crash in the middle of appending trial 2
        f.write('{"number": 2, "par')
    with open(tmp_path / "asks.jsonl", "a") as f:  # ... whose ask was recorded by a dead worker
        f.write(json.dumps({"event": "ask", "number": 2, "params": {"x": 0.25}, "info": {}, "started_at": 0.0,
                            "worker": "gone-1-x", "pid": -1, "host": "elsewhere"}) + "\n")
    r = Study(SPACE, "random", storage=tmp_path)
    assert len(r.trials) == 2  # the incomplete line is not read
    with pytest.warns(UserWarning, match=r"trials.jsonl'.*removed 18 bytes of an incomplete last line"):
        t = r.ask()
    assert (t.number, t.params) == (2, {"x": 0.25})  # the lost trial runs again
    r.tell(t, 2.0)
    assert [json.loads(ln)["number"] for ln in (tmp_path / "trials.jsonl").read_text().splitlines()] == [0, 1, 2]
    with open(tmp_path / "asks.jsonl", "a") as f:
        f.write("not json\n")
    with pytest.raises(ValueError, match=r"asks.jsonl', line \d+: not a trial event record"):
        Study(SPACE, "random", storage=tmp_path)


def test_storage_argument_forms(tmp_path):
    url = f"sqlite:///{tmp_path / 'a.db'}"
    s = Study(SPACE, "random", storage=url, seed=0)
    assert isinstance(s.storage, DatabaseStorage) and s.storage.heartbeat_interval == 60.0
    s.storage.close()
    assert isinstance(Study(SPACE, "random", storage=str(tmp_path / "d"), seed=0).storage, DirectoryStorage)
    obj = DirectoryStorage(tmp_path / "e")
    assert Study(SPACE, "random", storage=obj, seed=0).storage is obj
    with pytest.raises(ValueError, match=r"storage must be a directory path, a database URL .* got int: 3"):
        Study(SPACE, "random", storage=3)
    assert isinstance(open_storage(tmp_path / "f"), DirectoryStorage)


def test_database_open_errors_are_immediate_and_name_the_url(tmp_path):
    db = tmp_path / "ro.db"
    Study(SPACE, "random", storage=DatabaseStorage(f"sqlite:///{db}", heartbeat_interval=None), seed=0)
    ro = f"sqlite:///file:{db}?mode=ro&uri=true"
    t0 = time.perf_counter()
    with pytest.raises(StorageError, match=re.escape(f"study storage '{ro}' cannot be opened for writing: ")
                       + "OperationalError: attempt to write a readonly database"):
        DatabaseStorage(ro, heartbeat_interval=None)
    assert time.perf_counter() - t0 < 30  # not a busy-wait of retries
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StorageError, match=r"study storage 'sqlite:///.*/file/x.db' cannot be opened: its directory"):
        DatabaseStorage(f"sqlite:///{blocker}/x.db")
    with pytest.raises(StorageError, match=r"'nosuchdb://x' is not a SQLAlchemy URL|'nosuchdb://x' cannot be opened"):
        DatabaseStorage("nosuchdb://x")
    try:
        import psycopg  # noqa: F401
    except ImportError:  # the password is hidden, the extra to install named
        with pytest.raises(StorageError, match=r"'postgresql\+psycopg://u:\*\*\*@h/d'.*driver is not installed.*"
                                               r"rl2fx\[postgres\]"):
            DatabaseStorage("postgresql+psycopg://u:secret@h/d")
    with pytest.raises(ValueError, match=r"grace_period must exceed heartbeat_interval=1.0.*got grace_period=0.5"):
        DatabaseStorage(f"sqlite:///{db}", heartbeat_interval=1.0, grace_period=0.5)
    with pytest.raises(ValueError, match=r"heartbeat_interval must be a positive finite number .* got -1"):
        DatabaseStorage(f"sqlite:///{db}", heartbeat_interval=-1)


def test_database_resume_reports_nan_and_state_dict(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    a = Study(SPACE, "random", maximize=False, storage=url, seed=3, pruner="median")
    b = Study(SPACE, "random", maximize=False, storage=url, pruner="median")
    assert b.sampler.seed == 3
    ta, tb = a.ask(), b.ask()
    a.report(ta, 0.5, 1)
    a.report(ta, 0.9, 1)  # a step already reported keeps its first value
    assert b.refresh().pending[0].intermediate == {"1": 0.5}  # b's pruner sees a's reports
    a.tell(ta, float("nan"))
    b.report(tb, 0.25, 1)
    b.tell(tb, 0.25)
    r = Study(SPACE, "random", maximize=False, storage=url, pruner="median")
    assert [t.number for t in r.trials] == [0, 1] and r.trials[0].state == "failed"
    assert math.isnan(r.trials[0].value) and r.trials[0].intermediate == {"1": 0.5}
    assert r.best_value == 0.25
    other = Study(SPACE, "random", maximize=False, seed=3)
    other.add_trial({"x": 0.0}, 1.0)
    r.load_state_dict(other.state_dict())
    assert [(t.number, t.value) for t in r.refresh().trials] == [(0, 1.0)]
    for s in (a, b, r):
        s.storage.close()


def test_database_late_tell_after_stale_failure_keeps_the_result(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    slow = Study(SPACE, "random", storage=DatabaseStorage(url, heartbeat_interval=30.0), seed=0)
    fast = Study(SPACE, "random", storage=DatabaseStorage(url, heartbeat_interval=0.1, grace_period=0.3))
    t = slow.ask()  # slow's next heartbeat is 30 s away: to fast it looks dead after 0.3 s
    time.sleep(0.5)
    fast.add_trial({"x": 0.0}, 1.0)  # fast's stale check fails t and queues its retry
    failed = next(x for x in fast.refresh().trials if x.number == t.number)
    assert failed.state == "failed" and "stale heartbeat: worker died" in failed.error
    assert [x.number for x in slow.refresh().pending] == [t.number]  # to slow, t still runs
    with pytest.warns(UserWarning, match=rf"trial {t.number} was failed for a stale heartbeat.*its queued retry was removed"):
        slow.tell(t, 2.0)
    trials = fast.refresh().trials
    # t (0) and the added trial (2) complete; the retry of t (1) is gone, so nothing runs twice
    assert sorted((x.number, x.state) for x in trials) == [(0, "complete"), (2, "complete")]
    assert fast.ask().number == 3
    for s in (slow, fast):
        s.storage.close()


def test_forget_pending_requeues_with_the_same_number(tmp_path):
    for storage in (tmp_path / "d", f"sqlite:///{tmp_path / 's.db'}"):
        s = Study(GRID, GridSampler(grid_size=10), storage=storage)
        t0, t1 = s.ask(), s.ask()
        s.tell(t0, 1.0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert [t.number for t in s.forget_pending()] == [t1.number]
        again = s.ask()
        assert (again.number, again.params) == (t1.number, t1.params)
        s.tell(again, 2.0)
        assert [t.number for t in s.trials] == [0, 1]
        s.storage.close()


def test_rl2fx_tune_with_a_database_url(tmp_path, capsys):
    from rl2fx.trainer.config import ConfigError, load_config
    from rl2fx.trainer.tune import tune_from_config

    url = f"sqlite:///{tmp_path / 'tune.db'}"
    quiet = {"experiment_tracking.enabled": False, "memory_optimization.profiling.enabled": False,
             "trainer.progress_bar": False, "data.prompts_per_rollout": 2, "data.responses_per_prompt": 4,
             "trainer.total_steps": 2, "hyperopt.optimizer_type": "grid", "hyperopt.n_trials": 2,
             "hyperopt.save_dir": str(tmp_path / "summary"), "hyperopt.storage": url}
    space = [HyperparameterConfig("actor.clip", "categorical", choices=[0.1, 0.3])]
    best = tune_from_config(load_config("demo", overrides=quiet), param_configs=space, show_progress_bar=False)
    assert f"study: {url}; summary in {tmp_path / 'summary'}" in capsys.readouterr().out
    stored = Study(space, GridSampler(grid_size=10), storage=DatabaseStorage(url, heartbeat_interval=None))
    assert sorted(t.params["actor.clip"] for t in stored.trials) == [0.1, 0.3]
    assert best == stored.best_params
    assert json.loads((tmp_path / "summary" / "best_params.json").read_text())["best_params"] == best
    assert not (tmp_path / "summary" / "study.json").exists()  # the study itself is in the database
    stored.storage.close()
    with pytest.raises(ConfigError, match=r"'hyperopt.storage' must be null or a database URL.*got 'sqlite:/x.db'"):
        load_config("demo", overrides={**quiet, "hyperopt.storage": "sqlite:/x.db"})


def test_rl2fx_tune_on_a_dask_scheduler(tmp_path, capsys):
    """``rl2fx tune --dask-scheduler ADDRESS`` runs the trials on the scheduler's workers."""
    from dask.distributed import LocalCluster

    from rl2fx.cli import main

    args = ["tune", "--config", "demo", "trainer.total_steps=2", "hyperopt.n_trials=2", "hyperopt.optimizer_type=grid",
            "experiment_tracking.enabled=false", "memory_optimization.profiling.enabled=false",
            "data.prompts_per_rollout=2", "data.responses_per_prompt=4", f"hyperopt.save_dir={tmp_path / 'study'}",
            "hyperopt.params=[actor.clip]", "hyperopt.grid.grid_size=2"]
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster:
        assert main(["tune", "--dask-scheduler", cluster.scheduler_address, *args[1:], "hyperopt.pruner=median"]) == 2
        assert "'hyperopt.pruner' must be 'none' when trials run on another executor" in capsys.readouterr().err
        assert main(["tune", "--dask-scheduler", cluster.scheduler_address, *args[1:]]) == 0
    out = capsys.readouterr().out
    assert "best 2 of 2 trials (0 failed, 0 pruned)" in out
    lines = [json.loads(ln) for ln in (tmp_path / "study" / "trials.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(t["state"] == "complete" for t in lines)
    assert len({t["params"]["actor.clip"] for t in lines}) == 2


def test_max_trials_is_a_budget_shared_by_all_workers(tmp_path):
    from rl2fx.tuning.study import TrialBudgetReached

    # two workers in one process: a database (a directory takes an earlier Study of the same
    # process for one superseded by a re-run cell, see DirectoryStorage)
    for storage in (f"sqlite:///{tmp_path / 's.db'}",):
        a = Study(SPACE, "random", storage=storage, seed=0)
        b = Study(SPACE, "random", storage=storage)
        ta = a.ask(max_trials=3)
        a.tell(ta, 1.0)
        b.ask(max_trials=3)  # running
        a.ask(max_trials=3)
        with pytest.raises(TrialBudgetReached, match=r"max_trials=3 reached: 1 trials finished, 2 running"):
            b.ask(max_trials=3)
        with pytest.raises(ValueError, match=r"max_trials must be a positive integer or None, got 0"):
            b.ask(max_trials=0)
        a.storage.close()
        b.storage.close()
