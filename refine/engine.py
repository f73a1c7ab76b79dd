"""Run a stage's independent tasks through datatrove's executors: local processes, a Slurm array job or Ray.

A task is a plain function `run_task(task, n_tasks)` that does its share of the work and writes only its own
files (atomically); the stage claims the output before and writes the manifest after. datatrove's
executors own the rest: launching, per-task logs, and completion files (`completions/<task>` under the
logging dir), so a rerun runs only the tasks that did not finish.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from datatrove.executor import LocalPipelineExecutor, SlurmPipelineExecutor
from datatrove.executor.ray import RayPipelineExecutor  # imports Ray only when run
from datatrove.pipeline.base import PipelineStep
from datatrove.utils.logging import setup_default_logger
from loguru import logger
from tqdm.auto import tqdm

from refine.errors import RefineError
from refine.output import local_paths, write_text

# The local executor's slot (0..workers-1) of the task running in this process; a task on `auto`/`cuda` takes
# GPU slot % GPUs (refine.distributed.rank_device), so W workers on W GPUs run one task per GPU.
TASK_SLOT_ENV = "REFINE_TASK_SLOT"

# Where a task that stopped on a user's error (a RefineError) leaves its one-line message, in the logging dir.
ERRORS = "errors"

# How often the driver asks Slurm whether its array job is still queued or running, in seconds.
SLURM_POLL_S = float(os.environ.get("REFINE_SLURM_POLL_S", "30"))


class RunTask(PipelineStep):
    """A datatrove step whose `run(data, rank, world_size)` runs task `rank` of `world_size` of a stage."""

    name = "refine task"
    type = "refine"

    def __init__(self, run_task: Callable[[int, int], Any], errors_dir: Path, threads: int | None = None):
        super().__init__()
        self.run_task = run_task
        self.errors_dir = str(errors_dir)
        self.threads = threads

    def run(self, data, rank: int = 0, world_size: int = 1):
        if self.threads is not None:
            import torch  # imported here: sample's tasks run no model and need no torch

            torch.set_num_threads(self.threads)
        try:
            self.run_task(rank, world_size)
        except RefineError as e:
            # A user's error reaches the driver as a file, which it turns into its one `error:` line: raised from here,
            # it would first be printed with a traceback by datatrove. datatrove then records the task as finished;
            # the driver forgets that before it stops, so a rerun runs the task again.
            write_text(Path(self.errors_dir) / f"{rank:05d}", str(e))
        return data


class LocalTasks(LocalPipelineExecutor):
    """datatrove's local executor, telling each task which of the `workers` slots it holds (no two tasks at once
    share one). With `quiet`, a task's log goes to its file only (errors also to the console)."""

    def __init__(self, *args, quiet: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.quiet = quiet

    def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1):
        os.environ[TASK_SLOT_ENV] = str(local_rank)
        try:
            # datatrove prints a task's INFO log on the console only for local rank 0 (its file gets everything)
            return super()._run_for_rank(rank, 1 if self.quiet else local_rank, node_rank)
        finally:
            os.environ.pop(TASK_SLOT_ENV, None)
            if self.quiet:
                _console_warnings_only()  # datatrove put its default console log back when the task ended


def quiet_console() -> bool:
    """Whether the libraries' chatter stays off the console: refine's CLI turns huggingface_hub's progress bars off
    unless --verbose (refine.cli.quiet_libraries), and datatrove's logs follow the same switch."""
    from huggingface_hub.utils import are_progress_bars_disabled

    return are_progress_bars_disabled()


def _console_warnings_only() -> None:
    logger.remove()
    logger.add(sys.stderr, level="WARNING")


@dataclass
class FilesPresent:
    """What the driver's bar counts while tasks run: how many of the files `names` (the finished units: shards,
    task records) exist in `directory`, found with one listing per look."""

    directory: Path
    names: list[str]
    unit: str
    desc: str

    def done(self) -> int:
        try:
            return len(set(self.names).intersection(os.listdir(self.directory)))
        except OSError:  # not made yet
            return 0


@contextlib.contextmanager
def watching(progress: Optional[FilesPresent], every_s: float = 2.0):
    """One bar, with its time left, for the whole run: the driver counts the tasks' finished units on disk, so it
    works the same for local processes, a Slurm job and a Ray cluster."""
    if progress is None:
        yield
        return
    bar = tqdm(total=len(progress.names), initial=progress.done(), unit=progress.unit, desc=progress.desc,
               dynamic_ncols=True)
    stop = threading.Event()

    def poll():
        while not stop.wait(every_s):
            bar.update(progress.done() - bar.n)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        bar.update(progress.done() - bar.n)
        bar.close()


def uses_executor(cfg) -> bool:
    """Whether datatrove runs the stage's tasks (else this process, or each torchrun rank, is the one task)."""
    return cfg.executor != "local" or cfg.tasks > 1


def runs_models(cfg) -> bool:
    """Whether the stage's tasks run models (score, distill-cache: they have --device), so each needs torch and its
    share of the CPUs' threads; sample's tasks only read and write rows."""
    return hasattr(cfg, "device")


def local_workers(cfg) -> int:
    """Tasks at once on this machine: --workers, else one per GPU when the tasks run models on GPUs, else all (-1)."""
    if cfg.workers:
        return cfg.workers
    if not runs_models(cfg) or cfg.device not in ("auto", "cuda"):
        return -1
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else -1


def local_threads(n_at_once: int) -> int:
    """Torch threads per local task: this machine's CPUs shared among the tasks running at once. Each would
    otherwise start one thread per CPU, and their spinning threads would take turns on the same cores."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // n_at_once)


def logging_dir_for(output: str, given: str | None, n_tasks: int, inputs: list[str | None] = ()) -> Path:
    """Where datatrove keeps this run's logs and completion files: one folder per task count, since task t of N
    covers other shards than task t of M. By default `.<output name>.tasks/<N>-tasks` beside the output; a
    --logging-dir inside the output or an input (whose manifest would then list a foreign file) is refused."""
    output_path = Path(output).expanduser().absolute()
    root = Path(given).expanduser().absolute() if given else output_path.parent / f".{output_path.name}.tasks"
    for place in [output_path.resolve(), *(path for source in inputs for path in local_paths(source))]:
        if root.resolve() == place or place in root.resolve().parents:
            raise RefineError(f"--logging-dir {given!r} lies inside {str(place)!r}, which this command writes or reads; "
                              "choose a folder outside the output and the inputs")
    return root / f"{n_tasks}-tasks"


def forget_completions(logging_dir: Path, tasks: list[int]) -> None:
    """Make datatrove run these tasks again although it recorded them as finished."""
    for task in tasks:
        (logging_dir / "completions" / f"{task:05d}").unlink(missing_ok=True)


def make_executor(cfg, run_task: Callable[[int, int], Any], logging_dir: Path, job_name: str = "refine-score"):
    """The datatrove executor `cfg.executor` names, running `cfg.tasks` tasks of `run_task` (`job_name`: Slurm's)."""
    workers = cfg.workers or -1  # datatrove: -1 is all tasks at once
    if cfg.executor == "local":
        n_at_once = local_workers(cfg)
        threads = local_threads(cfg.tasks if n_at_once == -1 else min(n_at_once, cfg.tasks)) if runs_models(cfg) else None
        step = [RunTask(run_task, logging_dir / ERRORS, threads=threads)]
        return LocalTasks(step, tasks=cfg.tasks, workers=n_at_once, logging_dir=str(logging_dir), quiet=quiet_console())
    step = [RunTask(run_task, logging_dir / ERRORS)]  # Slurm and Ray give each task its own CPUs
    if cfg.executor == "slurm":
        return SlurmPipelineExecutor(
            step, tasks=cfg.tasks, workers=workers, time=cfg.slurm_time, partition=cfg.slurm_partition,
            cpus_per_task=cfg.cpus_per_task, gpus_per_task=cfg.gpus_per_task, mem_per_cpu_gb=cfg.mem_per_cpu_gb,
            job_name=job_name, env_command=cfg.slurm_env_command, logging_dir=str(logging_dir),
            qos=None,  # the cluster's default QOS; datatrove would ask for one named "normal"
            requeue_signals=None,  # a requeued task simply reruns its missing shards
        )
    return RayPipelineExecutor(step, tasks=cfg.tasks, workers=workers, logging_dir=str(logging_dir),
                               cpus_per_task=cfg.cpus_per_task, gpus_per_task=cfg.gpus_per_task,
                               mem_per_cpu_gb=cfg.mem_per_cpu_gb)


def run_tasks(cfg, run_task: Callable[[int, int], Any], logging_dir: Path, job_name: str = "refine-score",
              progress: Optional[FilesPresent] = None) -> None:
    """Run every unfinished task of `cfg.tasks` on `cfg.executor` and wait for them, showing `progress`; raise if
    any did not finish. Unless the CLI's --verbose, datatrove's logs go to the logging dir, not the console."""
    shutil.rmtree(logging_dir / ERRORS, ignore_errors=True)  # messages of an earlier run's tasks
    executor = make_executor(cfg, run_task, logging_dir, job_name)
    quiet = quiet_console()
    if quiet:
        _console_warnings_only()
    try:
        with watching(progress):
            if cfg.executor == "ray":
                _run_on_ray(executor, cfg)
            elif cfg.executor == "slurm":
                _run_on_slurm(executor)
            else:
                executor.run()
    finally:
        if quiet:
            setup_default_logger()
    failed = sorted(int(p.name) for p in (logging_dir / ERRORS).glob("[0-9]*"))
    if failed:
        forget_completions(logging_dir, failed)
        first = (logging_dir / ERRORS / f"{failed[0]:05d}").read_text()
        raise RefineError(f"{len(failed)} of {cfg.tasks} tasks stopped (each one's message: {logging_dir / ERRORS}); "
                          f"task {failed[0]}: {first}")
    unfinished = executor.get_incomplete_ranks(skip_completed=True)
    if unfinished:
        shown = ", ".join(map(str, unfinished[:10])) + (" ..." if len(unfinished) > 10 else "")
        raise RefineError(f"tasks {shown} of {cfg.tasks} did not finish (their logs: {logging_dir / 'logs'}); "
                          "rerun the same command to run only those")


def _run_on_slurm(executor) -> None:
    """Submit the array job, then wait while Slurm still lists it: the manifest needs every task's shards."""
    try:
        executor.run()
    except FileNotFoundError as e:
        raise RefineError(f"--executor slurm needs Slurm's `{Path(e.filename or 'sbatch').name}` on PATH; "
                          "run this command on a Slurm login node") from None
    except subprocess.CalledProcessError as e:
        raise RefineError(f"sbatch refused the job (exit {e.returncode}); check --slurm-partition, --slurm-time "
                          "and the Slurm log above") from None
    if executor.job_id in (None, -1):  # every task had finished already
        return
    while True:
        listed = subprocess.run(["squeue", "-h", "-j", str(executor.job_id)], capture_output=True, text=True)
        if listed.returncode == 0 and not listed.stdout.strip():
            return
        if listed.returncode != 0 and "invalid job id" in listed.stderr.lower():  # purged: long finished
            return
        time.sleep(SLURM_POLL_S)  # still queued or running, or the controller did not answer this time


def _run_on_ray(executor, cfg) -> None:
    """Join the cluster at --ray-address, or start a local one on loopback that lives as long as this command."""
    try:
        import ray
    except ImportError:
        raise RefineError("--executor ray needs Ray; pip install 'miniplm-refine[ray]'") from None
    started_here = not ray.is_initialized()
    if started_here:
        if cfg.ray_address:
            ray.init(address=cfg.ray_address, log_to_driver=False)
        else:
            n_cpus = cfg.cpus_per_task * (cfg.workers or cfg.tasks)
            ray.init(num_cpus=n_cpus, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    try:
        executor.run()
    finally:
        if started_here:
            ray.shutdown()
