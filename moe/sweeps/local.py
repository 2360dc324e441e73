"""The `local` executor: run a sweep on this machine, `max_parallel` worker processes at once.

Each worker is one process per run (a crash or a NaN takes down one run only), with its
output in RUN_DIR/worker.log (`RunDir.worker_log_path`). Workers are forked from a
server that has imported torch and the training job once (`multiprocessing`'s
forkserver, `PRELOAD`): a fresh interpreter spends about 3.5 CPU-seconds importing
them, as long as training a 250k-token pocket run, so a 30-run sweep saved about a
minute of its wall time on 2 cores. Where the forkserver is unavailable, or with
`MOE_LOCAL_WORKERS=exec`, a worker is `python -m moe.sweeps.job RUN_DIR` as before.
Either way the worker runs `moe.sweeps.job.main` with the environment of `worker_env`.
Progress goes to stderr: a tqdm bar over runs with the running runs' progress
and loss when stderr is a terminal, one plain line per event otherwise (no
escape codes in logs).

SIGTERM to the launcher (a `kill`, a logout, an outer scheduler) is handled like
Ctrl-C: every worker is terminated and its run marked failed ("relaunch to resume").
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from moe.errors import BadInput
from moe.procs import affinity_cores
from moe.rundir import RunDir
from moe.sweepdir import SweepDir
from moe.sweeps.executor import Executor, LaunchError, Started
from moe.sweeps.records import record_failure, record_submission
from moe.sweeps.scheduler import EXECUTOR_ENV, local_job_id

POLL_S = 0.5
PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # so workers import this checkout
WORKERS_ENV = "MOE_LOCAL_WORKERS"
"""`fork` (the default where the forkserver exists) or `exec` (a fresh interpreter per run)."""
PRELOAD = ["moe.sweeps.job", "moe.train.loop", "torch._dynamo"]
"""What the forkserver imports once for every worker: the job, the training loop with
torch, and torch._dynamo (the first AdamW of a process imports it, about 1 s)."""


@dataclass
class _Worker:
    run_dir: RunDir
    proc: subprocess.Popen | _Forked
    log: IO[bytes] | None  # an exec'd worker's output (a forked one opens its own)
    started_s: float


class _Forked:
    """A forked worker (`multiprocessing.Process`) behind the part of `subprocess.Popen`'s
    interface the launcher uses: pid, poll(), returncode, terminate(), wait()."""

    def __init__(self, process: multiprocessing.process.BaseProcess) -> None:
        self.process = process
        self.pid = process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.exitcode

    def poll(self) -> int | None:
        return self.process.exitcode

    def terminate(self) -> None:
        self.process.terminate()

    def wait(self, timeout: float | None = None) -> int | None:
        self.process.join(timeout)
        return self.process.exitcode


def _fork_context() -> multiprocessing.context.BaseContext | None:
    """The forkserver context with `PRELOAD` set, or None where workers must exec."""
    mode = os.environ.get(WORKERS_ENV, "fork")
    if mode not in ("fork", "exec"):
        raise LaunchError(f"{WORKERS_ENV}={mode!r}: use fork or exec")
    if mode == "exec" or "forkserver" not in multiprocessing.get_all_start_methods() \
            or multiprocessing.current_process().daemon:  # a daemon may not have children
        return None
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # takes effect when the server starts (once)
    return ctx


@contextlib.contextmanager
def _without_main_import():
    """Start processes whose child does not re-import the launcher's `__main__`.

    multiprocessing's spawn and forkserver children run the parent's main script again
    (as `__mp_main__`) so that functions defined there unpickle; our worker's function
    lives in this module, so that is not needed, and it would break launchers that are not
    scripts (`python - < file`: "No such file '<stdin>'") and re-run the top level of a
    user's script that calls `launch` without an `if __name__ == "__main__":` guard, once
    per worker. The preparation data loses its two main-module keys while we start one."""
    from multiprocessing import spawn

    original = spawn.get_preparation_data

    def without_main(name):
        data = original(name)
        data.pop("init_main_from_name", None)
        data.pop("init_main_from_path", None)
        return data

    spawn.get_preparation_data = without_main
    try:
        yield
    finally:
        spawn.get_preparation_data = original


def _forked_main(run_path: str, log_path: str, env: dict[str, str]) -> None:
    """A forked worker: the environment and output of an exec'd one, then the job's main.
    Torch was imported by the server, so its default thread count is set here from the
    worker's OMP_NUM_THREADS, as a fresh interpreter would read it."""
    os.environ.clear()
    os.environ.update(env)
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    for stream, target in ((sys.stdout, 1), (sys.stderr, 2)):
        stream.flush()
        os.dup2(fd, target)
    os.close(fd)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    import torch

    threads = env.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))
    from moe.sweeps import job

    code = job.main([run_path])
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)


@dataclass(frozen=True)
class LocalExecutor(Executor):
    max_parallel: int
    progress: bool
    name = "local"
    needs = ("torch",)  # the workers train

    @classmethod
    def from_options(cls, *, max_parallel: int, progress: bool, **_options) -> LocalExecutor:
        if not (isinstance(max_parallel, int) and max_parallel >= 1):
            raise LaunchError(f"--max-parallel {max_parallel} must be at least 1")
        _fork_context()  # a bad MOE_LOCAL_WORKERS is refused before anything is written
        return cls(max_parallel, progress)

    def start(self, runs: list[RunDir], sweep: SweepDir, plans: dict) -> Started:
        return Started(final_states=run_local(longest_first(runs, plans),
                                              max_parallel=self.max_parallel,
                                              progress=self.progress))


EXECUTOR = LocalExecutor


def longest_first(runs: list[RunDir], plans: dict) -> list[RunDir]:
    """The runs by planned training FLOPs, largest first (ties in the given order): a long
    run started last would keep one core busy while the others idle (longest-processing-
    time-first scheduling). Runs without a plan keep their place after the planned ones."""
    def flops(run: RunDir) -> float:
        plan = plans.get(run.name)
        return -getattr(plan, "flops", float("-inf")) if plan is not None else float("inf")

    return sorted(runs, key=flops)


def run_local(run_dirs: list[RunDir], *, max_parallel: int = 2, progress: bool = True
              ) -> dict[str, str]:
    """Run every directory's training in worker processes; return {run_id: final state}."""
    if max_parallel < 1:
        raise BadInput(f"max_parallel={max_parallel} must be >= 1")
    queue, running, final = list(run_dirs), [], {}
    ctx = _fork_context()
    display = Display(len(run_dirs), enabled=progress)
    with _sigterm_raises(), _stop_workers_on_error(running):
        try:
            while queue or running:
                while queue and len(running) < max_parallel:
                    _start(queue.pop(0), running, max_parallel, ctx)
                    display.event(f"started {running[-1].run_dir.name}")
                _wait_any(running, POLL_S)
                for w in [w for w in running if w.proc.poll() is not None]:
                    running.remove(w)
                    final[w.run_dir.name] = _finish(w)
                    display.finished(w.run_dir, final[w.run_dir.name], time.time() - w.started_s)
                display.refresh([w.run_dir for w in running])
        finally:
            display.close()
    return final


def _wait_any(running: list[_Worker], timeout_s: float) -> None:
    """Until a worker ends or `timeout_s` passes: forked workers are waited on (their
    sentinels), so the next run starts at once; exec'd ones are polled."""
    if running and all(isinstance(w.proc, _Forked) for w in running):
        multiprocessing.connection.wait([w.proc.process.sentinel for w in running], timeout_s)
    else:
        time.sleep(timeout_s)


class Terminated(KeyboardInterrupt):
    """The launcher received SIGTERM: handled like Ctrl-C."""


@contextlib.contextmanager
def _sigterm_raises():
    """Turn SIGTERM into `Terminated` in the main thread for the block (elsewhere: no-op)."""
    def handler(signum, frame):
        raise Terminated(f"received signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: signals cannot be handled here
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _stop_workers_on_error(running: list[_Worker]):
    """Ctrl-C, SIGTERM or an error in the launcher: leave no orphan workers behind."""
    try:
        yield
    except BaseException:
        for w in running:
            w.proc.terminate()
            w.proc.wait()
            _close_log(w)
            record_failure(w.run_dir, "launcher interrupted; relaunch to resume")
        raise


def worker_env(max_parallel: int = 1) -> dict[str, str]:
    """The launcher's environment plus this checkout on the path and, unless the user set it,
    OMP_NUM_THREADS = this machine's cores / max_parallel: the cap of the workers'
    `train.num_threads = "auto"`, so parallel runs divide the cores instead of sharing them."""
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, affinity_cores() // max_parallel))
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(PACKAGE_ROOT) + (os.pathsep + path if path else "")
    env[EXECUTOR_ENV] = "local"  # tells the worker its job id is its own pid
    return env


def worker_command(run: RunDir) -> list[str]:
    return [sys.executable, "-m", "moe.sweeps.job", str(run.path)]


def _start(run_dir: RunDir, running: list[_Worker], max_parallel: int,
           ctx: multiprocessing.context.BaseContext | None) -> None:
    """Start a worker (forked from `ctx`'s server, or exec'd without one) and add it to
    `running` before its job id is recorded, so a signal that arrives once the id is visible
    finds the worker to stop."""
    log = None
    if ctx is None:
        log = open(run_dir.worker_log_path, "ab")
        proc = subprocess.Popen(worker_command(run_dir), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=worker_env(max_parallel))
    else:
        process = ctx.Process(target=_forked_main, name=f"moe-worker-{run_dir.name}",
                              args=(str(run_dir.path), str(run_dir.worker_log_path),
                                    worker_env(max_parallel)))
        with _without_main_import():
            process.start()
        proc = _Forked(process)
    running.append(_Worker(run_dir=run_dir, proc=proc, log=log, started_s=time.time()))
    record_submission(run_dir, "local", local_job_id(proc.pid))


def _close_log(w: _Worker) -> None:
    if w.log is not None:
        w.log.close()


def _finish(w: _Worker) -> str:
    _close_log(w)
    if w.run_dir.is_done():
        return "done"
    state = w.run_dir.read_status().get("state")
    if state != "failed":  # the worker died before it could say why
        record_failure(w.run_dir, f"worker exited with code {w.proc.returncode} without a "
                                  f"result: {_last_line(w.run_dir.worker_log_path)}")
    return "failed"


def _last_line(path: Path) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return "(no worker.log)"
    return lines[-1][:200] if lines else "(empty worker.log)"


class Display:
    """Live progress on stderr: tqdm on a terminal, plain lines otherwise, or nothing."""

    def __init__(self, n_runs: int, *, enabled: bool, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.n_runs, self.n_finished = n_runs, 0
        self.bar = None
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=n_runs, unit="run", file=self.stream, dynamic_ncols=True)

    def event(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(f"[{self.n_finished}/{self.n_runs}] {text}", file=self.stream, flush=True)

    def finished(self, run_dir: RunDir, state: str, elapsed_s: float) -> None:
        self.n_finished += 1
        status = run_dir.read_status()
        loss = status.get("last_loss")
        detail = f"loss {loss:.4g}" if isinstance(loss, (int, float)) else ""
        if state == "failed":
            detail = f"reason: {status.get('reason')}"
        self.event(f"{state} {run_dir.name} in {elapsed_s:.1f}s {detail}".rstrip())
        if self.bar is not None:
            self.bar.update(1)

    def refresh(self, running: list[RunDir]) -> None:
        if self.bar is None:
            return
        parts = []
        for d in running:
            s = d.read_status()
            done, total, loss = s.get("tokens_done"), s.get("tokens_total"), s.get("last_loss")
            pct = f"{100 * done / total:.0f}%" if done is not None and total else "starting"
            parts.append(f"{d.name} {pct}" + (f" loss {loss:.3g}" if loss is not None else ""))
        self.bar.set_postfix_str(" | ".join(parts), refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
