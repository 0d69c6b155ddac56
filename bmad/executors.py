"""Where the runs of a sweep execute.

``local``: in this process, or (several GPUs, or ``workers`` > 1) in one worker process
per device, each pinned to its GPU through ``CUDA_VISIBLE_DEVICES``, all fed from one
queue so no run is done twice. ``ray``: one Ray task per run on an existing cluster (or a
local Ray instance), each asking for a GPU when the sweep runs on CUDA; every task writes
its record into the same (shared) results folder. Both executors run the same
:class:`~bmad.runner.Sweep` code per run, so they produce the same records.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from bmad.errors import BmadError, UsageError
from bmad.runner import RunOutcome, RunSpec, Sweep, SweepOptions, describe

EXECUTORS = ("local", "ray")


def worker_devices(device: str, workers: int | None = None) -> list[str]:
    """The device of each local worker: one per visible GPU for ``cuda`` (``workers``
    caps it), ``workers`` copies of any other device (default one)."""
    if workers is not None and workers < 1:
        raise UsageError("--workers must be at least 1")
    if device == "cuda":
        n = torch.cuda.device_count()
        if n == 0:
            raise UsageError("--device cuda but no GPU is visible", hint="use --device cpu")
        return [f"cuda:{i}" for i in range(min(n, workers or n))]
    return [device] * (workers or 1)


def run_sweep(specs: list[RunSpec], opts: SweepOptions, executor: str = "local", *, workers: int | None = None,
              address: str = "auto", cpus_per_run: float = 1.0) -> list[RunOutcome]:
    """Run ``specs`` on ``executor`` after one preflight check; outcomes in ``specs`` order."""
    if executor not in EXECUTORS:
        raise UsageError(f"unknown executor {executor!r}", hint=f"executors: {', '.join(EXECUTORS)}")
    opts = replace(opts, results=Path(opts.results).resolve(),
                   data_root=Path(opts.data_root).resolve() if opts.data_root else None)
    sweep = Sweep(opts)
    sweep.preflight(specs)
    if executor == "ray":
        return _run_ray(specs, sweep, address, cpus_per_run)
    devices = worker_devices(opts.device, workers)
    if len(devices) == 1:
        sweep.opts = replace(opts, device=devices[0])
        return sweep.run_all(specs, preflight=False)
    return _run_processes(specs, sweep, devices)


# -- local worker processes ---------------------------------------------------------------
MAX_STARTUP_DEATHS = 3  # a slot whose fresh workers die this often in a row before finishing a run: give up


def _worker(slot: int, device: str, opts: SweepOptions, tasks: Any, events: Any, threads: int) -> None:
    """Run the specs sent on ``tasks`` (None: stop); report (slot, index, outcome) on ``events``.
    Exits when its parent dies (a SIGKILLed sweep), not to block on ``tasks`` forever holding its
    memory and, on a GPU, its CUDA context."""
    parent = mp.parent_process()
    if parent is not None:
        threading.Thread(target=lambda: (parent.join(), os._exit(1)), daemon=True).start()
    torch.set_num_threads(threads)
    sweep = Sweep(replace(opts, device=device, progress=False, verbose=False))
    while (task := tasks.get()) is not None:
        index, spec = task
        events.put((slot, index, sweep.run_one(spec)))


class _Slot:
    """One worker process, its device, its own task queue and the run it was given."""

    def __init__(self, ctx: Any, slot: int, device: str, opts: SweepOptions, events: Any, threads: int) -> None:
        self.device = device
        self.tasks = ctx.Queue()
        self.index: int | None = None
        self.started = 0.0
        self.deaths = 0
        env_device = device
        saved = os.environ.get("CUDA_VISIBLE_DEVICES")
        if device.startswith("cuda:"):  # pin: the worker sees one GPU, as cuda:0
            os.environ["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1]
            env_device = "cuda:0"
        try:
            self.proc = ctx.Process(target=_worker, args=(slot, env_device, opts, self.tasks, events, threads),
                                    daemon=True)
            self.proc.start()
        finally:
            if device.startswith("cuda:"):
                if saved is None:
                    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
                else:
                    os.environ["CUDA_VISIBLE_DEVICES"] = saved

    def give(self, task: tuple[int, RunSpec] | None) -> None:
        self.index, self.started = (task[0], time.perf_counter()) if task else (None, 0.0)
        self.tasks.put(task)


def _run_processes(specs: list[RunSpec], sweep: Sweep, devices: list[str]) -> list[RunOutcome]:
    """One spawned worker per entry of ``devices``, each handed one run at a time, so the
    parent always knows which run a worker holds: a worker that dies (e.g. SIGKILLed by
    the kernel's OOM killer) has that run recorded as failed, and is replaced."""
    ctx = mp.get_context("spawn")
    events = ctx.Queue()
    threads = max(1, (os.cpu_count() or 1) // len(devices)) if devices[0] == "cpu" else torch.get_num_threads()
    todo = iter(enumerate(specs))
    slots = [_Slot(ctx, i, d, sweep.opts, events, threads) for i, d in enumerate(devices)]
    for slot in slots:
        slot.give(next(todo, None))
    outcomes: dict[int, RunOutcome] = {}
    bar = tqdm(total=len(specs), desc="sweep", unit="run", disable=not sweep.opts.progress)
    try:
        while len(outcomes) < len(specs):
            try:
                i, index, outcome = events.get(timeout=1.0)
            except queue.Empty:
                for i, slot in enumerate(slots):
                    if slot.index is not None and not slot.proc.is_alive():
                        slots[i] = _replace(ctx, i, slot, specs, sweep, events, threads, outcomes, bar, todo)
                continue
            if index != slots[i].index:  # from a worker already given up as dead: its run is recorded
                continue
            outcomes[index] = outcome
            _report(sweep, outcome, len(outcomes), len(specs), time.perf_counter() - slots[i].started, bar)
            slots[i].deaths = 0
            slots[i].give(next(todo, None))
    finally:
        for slot in slots:
            if slot.index is not None:
                slot.tasks.put(None)
        for slot in slots:
            slot.proc.join(timeout=10)
            if slot.proc.is_alive():
                slot.proc.kill()
        bar.close()
    return [outcomes[i] for i in range(len(specs))]


def _replace(ctx: Any, i: int, dead: _Slot, specs: list[RunSpec], sweep: Sweep, events: Any, threads: int,
             outcomes: dict[int, RunOutcome], bar: Any, todo: Any) -> _Slot:
    """Record the run a dead worker held as failed; start a new worker in its place."""
    code = dead.proc.exitcode
    if dead.index is not None and dead.index not in outcomes:
        why = f"the worker process on {dead.device} died (exit code {code}) during this run" + (
            " (SIGKILL: the kernel's OOM killer, if `dmesg` says so)" if code == -9 else "")
        cause = "killed" if code == -9 else "worker_died"
        outcomes[dead.index] = sweep.record_failure(specs[dead.index], cause, why)
        _report(sweep, outcomes[dead.index], len(outcomes), len(specs), time.perf_counter() - dead.started, bar)
    if dead.deaths + 1 >= MAX_STARTUP_DEATHS:
        raise BmadError(f"worker processes on {dead.device} died {MAX_STARTUP_DEATHS} times in a row "
                        f"(last exit code {code}) before finishing a run",
                        hint="run with --workers 1 to see the error in this process")
    fresh = _Slot(ctx, i, dead.device, sweep.opts, events, threads)
    fresh.deaths = dead.deaths + 1
    fresh.give(next(todo, None))
    return fresh


def _report(sweep: Sweep, outcome: RunOutcome, done: int, total: int, seconds: float, bar: Any) -> None:
    bar.update(1)
    if sweep.opts.verbose:
        tqdm.write(f"[{done}/{total}] {describe(outcome, seconds)}")


# -- Ray ----------------------------------------------------------------------------------
def _ray_task(spec: RunSpec, opts: SweepOptions) -> RunOutcome:
    """One run inside a Ray worker (Ray has set CUDA_VISIBLE_DEVICES for a GPU task)."""
    return Sweep(opts).run_one(spec)


def _run_ray(specs: list[RunSpec], sweep: Sweep, address: str, cpus_per_run: float) -> list[RunOutcome]:
    try:
        import ray
    except ImportError:
        raise UsageError("--executor ray needs Ray, which is not installed",
                         hint="pip install 'bmad[ray]'") from None
    opts = sweep.opts
    gpus = 1 if opts.device.startswith("cuda") else 0
    task_opts = replace(opts, device="cuda" if gpus else opts.device, progress=False, verbose=False)
    started_here = not ray.is_initialized()
    if started_here:
        _ray_init(ray, address)
    remote = ray.remote(num_cpus=cpus_per_run, num_gpus=gpus, max_retries=0)(_ray_task)
    pending = {remote.remote(spec, task_opts): (i, time.perf_counter()) for i, spec in enumerate(specs)}
    outcomes: dict[int, RunOutcome] = {}
    bar = tqdm(total=len(specs), desc="sweep (ray)", unit="run", disable=not opts.progress)
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            index, t0 = pending.pop(ready[0])
            try:
                outcomes[index] = ray.get(ready[0])
            except ray.exceptions.RayError as exc:  # the task itself died (worker crash, node lost, OOM kill)
                cause = "out_of_memory" if isinstance(exc, getattr(ray.exceptions, "OutOfMemoryError", ())) \
                    else "worker_died"
                outcomes[index] = sweep.record_failure(specs[index], cause, f"{type(exc).__name__}: {exc}")
            _report(sweep, outcomes[index], len(outcomes), len(specs), time.perf_counter() - t0, bar)
    finally:
        bar.close()
        if started_here:
            ray.shutdown()
    return [outcomes[i] for i in range(len(specs))]


def _ray_init(ray: Any, address: str) -> None:
    """Connect to the cluster at ``address`` ("auto": the one this machine belongs to, or
    a new local instance when there is none; "local": always a new local instance)."""
    env = {k: v for k, v in os.environ.items() if k == "PYTHONPATH" or k.startswith("BMAD_")}
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env}, "include_dashboard": False,
                              "log_to_driver": False}
    if address == "local":
        ray.init(**kwargs)
        return
    try:
        ray.init(address=address, **kwargs)
    except ConnectionError:
        if address != "auto":
            raise UsageError(f"no Ray cluster at {address}",
                             hint="start one (`ray start --head`), or use --address auto / local") from None
        with contextlib.suppress(Exception):
            ray.shutdown()
        ray.init(**kwargs)
