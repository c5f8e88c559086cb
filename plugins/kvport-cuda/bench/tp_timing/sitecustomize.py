"""Phase timing of a tensor-parallel run, for diagnosis only (tp_check.py --rank-timing).

Put this folder on PYTHONPATH and set KVPORT_TP_TIMING_DIR: every Python process started with
that environment (the engine's and each spawned rank's) imports this module first and wraps:

* in the engine process: scheduling, the executor's launch, the wait for a step's output,
  the scheduler update and the whole engine step;
* in each rank: the launch of a step (input preparation + kernel launches), the wait for the
  previous step's GPU work, and everything else (pipe receive, unpickling, answering);
  rank 0 also records the GPU time by kernel over 60 large decode steps (torch.profiler).

Each process writes <pid>.json into the folder when it exits. Nothing here runs unless the
variable is set, and nothing in kvport imports it.
"""
import atexit
import json
import os
import time
from collections import defaultdict

FOLDER = os.environ.get("KVPORT_TP_TIMING_DIR")


def _install() -> None:
    seconds, calls = defaultdict(float), defaultdict(int)
    meta = {"pid": os.getpid(), "start": time.perf_counter()}

    def wrap(owner, name, phase):
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                seconds[phase] += time.perf_counter() - start
                calls[phase] += 1
        setattr(owner, name, timed)

    from kvport.core import engine, executor, executor_process, scheduler
    wrap(engine.LLMEngine, "_step", "engine step")
    wrap(scheduler.Scheduler, "schedule", "engine schedule")
    wrap(scheduler.Scheduler, "update_from_output", "engine update")
    wrap(executor.MultiprocExecutor, "execute_model_async", "engine launch (send)")
    wrap(executor._ExecutorStep, "result", "engine wait for output")
    from kvport.torch_worker import pending, worker        # TP=1: the worker is in-process
    wrap(worker.TorchWorker, "execute_model_async", "worker launch (tp1 engine, or inside a rank)")
    wrap(pending.PendingSample, "result", "worker wait for sampled ids (tp1 engine, or a rank)")
    _wrap_rank(executor_process._AsyncSteps, seconds, calls, meta)

    def dump(name=None):
        meta["wall"] = time.perf_counter() - meta["start"]
        if calls:
            with open(os.path.join(FOLDER, f"{name or os.getpid()}.json"), "w") as f:
                json.dump({"meta": meta, "seconds": seconds, "calls": calls}, f, indent=1)
        seconds.clear()
        calls.clear()
        meta["start"] = time.perf_counter()
    atexit.register(dump)

    shutdown = engine.LLMEngine.shutdown
    engines = iter(range(1000))

    def shutdown_and_dump(self, *args, **kwargs):     # one file per engine of this process
        dump(f"{os.getpid()}-engine{next(engines)}-tp"
             f"{self.config.parallel.tensor_parallel_size}")
        return shutdown(self, *args, **kwargs)
    engine.LLMEngine.shutdown = shutdown_and_dump


def _wrap_rank(steps_class, seconds, calls, meta) -> None:
    state = {"profiled": 0, "profiler": None, "last_end": None}

    def execute_model_async(self, scheduler_output):
        now = time.perf_counter()
        if state["last_end"] is not None:
            seconds["rank between calls (recv, unpickle, answer)"] += now - state["last_end"]
        rank0 = getattr(self.worker, "parallel", None) is not None and self.worker.parallel.rank == 0
        big = len(scheduler_output.num_scheduled_tokens) >= 200 and \
            scheduler_output.total_num_scheduled_tokens == len(scheduler_output.num_scheduled_tokens)
        if rank0 and big:
            _profile_step(state, meta)
        start = time.perf_counter()
        launched = self.worker.execute_model_async(scheduler_output)
        mid = time.perf_counter()
        result = self._swap(launched)
        end = time.perf_counter()
        seconds["rank launch (inputs + kernels)"] += mid - start
        seconds["rank wait for previous step (GPU)"] += end - mid
        calls["rank steps"] += 1
        if big:
            seconds["rank large-decode launch"] += mid - start
            seconds["rank large-decode wait"] += end - mid
            calls["rank large-decode steps"] += 1
        state["last_end"] = time.perf_counter()
        return result
    steps_class.execute_model_async = execute_model_async


def _profile_step(state, meta) -> None:
    """Profile rank 0's GPU over 60 large decode steps, once."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    if state["profiled"] == 0:
        state["profiler"] = profile(activities=[ProfilerActivity.CUDA])
        state["profiler"].__enter__()
        state["t0"] = time.perf_counter()
    state["profiled"] += 1
    if state["profiled"] == 61:
        torch.cuda.synchronize()
        state["profiler"].__exit__(None, None, None)
        wall = time.perf_counter() - state["t0"]
        rows = []
        for event in state["profiler"].key_averages():
            us = getattr(event, "device_time_total", 0)
            if us > 0:
                rows.append((event.key[:80], event.count, us / 1e3))
        rows.sort(key=lambda r: -r[2])
        meta["gpu_profile_60_steps"] = {"wall_ms": wall * 1e3,
                                        "kernel_ms_total": sum(r[2] for r in rows),
                                        "top": rows[:25]}


if FOLDER:
    try:
        _install()
    except Exception as exc:         # a diagnosis aid must never break the run it watches
        print(f"tp_timing: not installed: {type(exc).__name__}: {exc}", flush=True)
