"""`refine score` on datatrove's executors: local processes, Slurm (stand-in commands on PATH) and a real local Ray cluster.

Every run must give exactly the scores of one process scoring everything, whatever the executor and task count.
"""

import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest
import torch

from refine import engine
from refine.config import SampleConfig, ScoreConfig
from refine.errors import RefineError
from refine.sample import sample
from refine.score import score

N_DOCS = 24


@pytest.fixture(scope="module")
def models(teacher_dir, reference_dir):
    return teacher_dir, reference_dir


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("engine-corpus") / "corpus.jsonl"
    with open(path, "w") as f:
        for i in range(N_DOCS):
            text = f"Document {i}. " + " ".join(f"word{(i * 5 + j) % 17}" for j in range(10 + 2 * i))
            f.write(json.dumps({"text": text}) + "\n")
    return path


def config(corpus, models, output, **kwargs) -> ScoreConfig:
    teacher, reference = models
    settings = dict(data=str(corpus), teacher=str(teacher), reference=str(reference), output=str(output),
                    max_length=32, shard_size=3, device="cpu")
    return ScoreConfig(**{**settings, **kwargs})


def scores_table(output: Path):
    """Every shard, in name order (the names and their contents must not depend on the executor)."""
    files = sorted((output / "data").glob("scores-*.parquet"))
    return [f.name for f in files], pq.read_table(files).replace_schema_metadata(None)


def counts(manifest: dict) -> tuple:
    return manifest["n_instances"], manifest["n_tokens"], [(f["path"], f["rows"]) for f in manifest["files"] if "rows" in f]


@pytest.fixture(scope="module")
def one_task(corpus, models, tmp_path_factory):
    output = tmp_path_factory.mktemp("one-task") / "scores"
    manifest = score(config(corpus, models, output))
    return manifest, scores_table(output), output


def test_local_executor_two_workers_four_tasks_equals_one_task(corpus, models, tmp_path, one_task):
    output = tmp_path / "scores"
    manifest = score(config(corpus, models, output, tasks=4, workers=2))
    names, table = scores_table(output)
    assert names == one_task[1][0]
    assert table.equals(one_task[1][1])
    assert counts(manifest) == counts(one_task[0])
    assert manifest["world_size"] == 4 and manifest["executor"] == "local"
    completions = tmp_path / ".scores.tasks" / "4-tasks" / "completions"
    assert sorted(p.name for p in completions.iterdir()) == ["00000", "00001", "00002", "00003"]

    # ... and the same refined dataset: rows, columns and order, also when sample's pass runs as 4 tasks in 2 processes.
    refined = {}
    for name, scores_dir, tasks in (("one task", one_task[2], 1), ("four tasks", output, 1), ("sampled by 4", output, 4)):
        sample(SampleConfig(scores=str(scores_dir), output=str(tmp_path / name), alpha=0.5, tasks=tasks, workers=2))
        refined[name] = datasets.load_dataset(str(tmp_path / name), split="train").to_pandas()
    assert len(refined["one task"]) == N_DOCS // 2
    assert refined["one task"].equals(refined["four tasks"]) and refined["one task"].equals(refined["sampled by 4"])


@pytest.mark.slow
def test_a_users_error_inside_a_task_is_one_line_and_the_task_reruns(corpus, models, tmp_path):
    """--max-length beyond the models' positions is found only where the models load: inside each task."""
    teacher, reference = models
    command = [sys.executable, "-m", "refine", "score", str(corpus), "--teacher", str(teacher), "--reference",
               str(reference), "--output", str(tmp_path / "scores"), "--device", "cpu", "--shard-size", "6",
               "--tasks", "2", "--workers", "2"]
    failed = subprocess.run([*command, "--max-length", "100000"], capture_output=True, text=True)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: 2 of 2 tasks stopped")
    assert errors[0].endswith("exceeds the 512 positions of reference " + repr(str(reference)) + "; lower --max-length")
    assert not (tmp_path / "scores" / "manifest.json").exists()
    completions = tmp_path / ".scores.tasks" / "2-tasks" / "completions"
    assert not completions.exists() or not list(completions.iterdir())  # both tasks run again
    finished = subprocess.run([*command, "--max-length", "32", "--overwrite"], capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    # one bar over the shards on disk; datatrove's task logs only in their files (--verbose shows them)
    assert "scoring: 100%" in finished.stderr and "| INFO " not in failed.stderr + finished.stderr
    assert "Launching pipeline" in (tmp_path / ".scores.tasks" / "2-tasks" / "logs" / "task_00000.log").read_text()
    assert (tmp_path / "scores" / "manifest.json").exists() and not list((tmp_path / ".scores.tasks" / "2-tasks" /
                                                                          "errors").glob("*"))


def test_a_logging_dir_inside_an_input_or_the_output_is_refused(corpus, models, tmp_path, one_task):
    for inside in (one_task[2] / "logs", tmp_path / "out" / "logs"):
        with pytest.raises(RefineError, match="lies inside .*choose a folder outside the output and the inputs"):
            sample(SampleConfig(scores=str(one_task[2]), output=str(tmp_path / "out"), tasks=2, logging_dir=str(inside)))
    assert not (one_task[2] / "logs").exists()


# Stand-ins for Slurm's commands: sbatch records the script and runs every array task of it at once, on this machine,
# with the variables Slurm sets; the job has finished when sbatch returns, so squeue lists nothing.
STAND_INS = {
    "sbatch": '''
        import os, re, subprocess, sys
        *options, script = sys.argv[1:]
        record = os.environ["SLURM_STAND_IN_RECORD"]
        job_id = str(100 + len([n for n in os.listdir(record) if n.endswith(".slurm")]))
        text = open(script).read()
        open(os.path.join(record, f"{job_id}.slurm"), "w").write(text)
        env = dict(os.environ)
        for option in options:
            if option.startswith("--export="):
                env.update(item.split("=", 1) for item in option.split("=", 1)[1].split(",") if "=" in item)
        array = re.search(r"^#SBATCH --array=(\\d+)-(\\d+)", text, re.M)
        log = re.search(r"^#SBATCH --output=(.*)$", text, re.M).group(1)
        skipped = os.environ.get("SLURM_STAND_IN_SKIP", "").split(",")  # array tasks whose node "died" before they ran
        for task in range(int(array.group(1)), int(array.group(2)) + 1) if array else [0]:
            if str(task) in skipped:
                continue
            task_env = {**env, "SLURM_JOB_ID": job_id, "SLURM_ARRAY_JOB_ID": job_id, "SLURM_NODELIST": "localhost",
                        "SLURM_PROCID": "0", "SLURM_NODEID": "0"}
            if array:
                task_env["SLURM_ARRAY_TASK_ID"] = str(task)
            with open(log.replace("%A", job_id).replace("%a", str(task)), "w") as out:
                subprocess.run(["bash", script], env=task_env, stdout=out, stderr=subprocess.STDOUT)
        print(f"Submitted batch job {job_id}")
    ''',
    "srun": '''
        import os, sys
        words = sys.argv[1:]
        while words and words[0].startswith("-"):
            words = words[2:] if words[0] in ("-n", "-N") else words[1:]
        os.execvp(words[0], words)
    ''',
    "squeue": "",
    "scontrol": '''
        import sys
        if sys.argv[1:3] == ["show", "hostnames"]:
            print("\\n".join(sys.argv[3].split(",")))
    ''',
    "sacct": "print('COMPLETED')",
}


def install_slurm_stand_ins(directory: Path) -> Path:
    directory.mkdir()
    for name, body in STAND_INS.items():
        path = directory / name
        path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
        path.chmod(0o755)
    return directory


def test_slurm_array_job_equals_one_task(corpus, models, tmp_path, one_task, monkeypatch):
    bin_dir = install_slurm_stand_ins(tmp_path / "bin")
    record = tmp_path / "submitted"
    record.mkdir()
    # The array tasks run datatrove's `launch_pickled_pipeline`, installed beside this Python.
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_STAND_IN_RECORD", str(record))
    output = tmp_path / "scores"
    cfg = config(corpus, models, output, executor="slurm", tasks=3, slurm_partition="gpu", slurm_time="00:30:00",
                 gpus_per_task=1, cpus_per_task=2)
    manifest = score(cfg)
    names, table = scores_table(output)
    assert names == one_task[1][0]
    assert table.equals(one_task[1][1])
    assert counts(manifest) == counts(one_task[0])
    assert manifest["executor"] == "slurm" and manifest["world_size"] == 3

    scripts = sorted(record.glob("*.slurm"))
    array_job = scripts[0].read_text()  # then datatrove's stats-merging job
    for directive in ("--array=0-2", "--gpus=1", "--time=00:30:00", "--partition=gpu", "--cpus-per-task=2"):
        assert f"#SBATCH {directive}\n" in array_job
    assert "launch_pickled_pipeline" in array_job

    # A rerun submits nothing: every task is recorded as finished and every shard exists.
    (output / "manifest.json").unlink()
    score(cfg)
    assert len(list(record.glob("*.slurm"))) == len(scripts)

    # sample's corpus pass as an array job: a task that never ran stops the run with nothing at the output; the rerun
    # submits only that task, and the refined rows equal those of one process.
    options = dict(scores=str(output), alpha=0.5, executor="slurm", tasks=2, slurm_partition="cpu")
    monkeypatch.setenv("SLURM_STAND_IN_SKIP", "1")
    with pytest.raises(RefineError, match="tasks 1 of 2 did not finish"):
        sample(SampleConfig(output=str(tmp_path / "refined"), **options))
    assert not (tmp_path / "refined").exists()
    monkeypatch.delenv("SLURM_STAND_IN_SKIP")
    submitted = len(list(record.glob("*.slurm")))
    manifest = sample(SampleConfig(output=str(tmp_path / "refined"), **options))
    rerun = sorted(record.glob("*.slurm"), key=lambda p: int(p.stem))[submitted].read_text()
    assert "#SBATCH --array=0-0\n" in rerun and "#SBATCH --partition=cpu\n" in rerun  # one task: the unfinished one
    sample(SampleConfig(scores=str(one_task[2]), output=str(tmp_path / "refined-1"), alpha=0.5))
    refined, alone = (datasets.load_dataset(str(tmp_path / name), split="train").to_pandas() for name in ("refined", "refined-1"))
    assert manifest["tasks"] == 2 and len(refined) == N_DOCS // 2 and refined.equals(alone)


def processes() -> dict[int, str]:
    """pid -> command line (as the process shows it: Ray names its workers `ray::<Actor>.<method>`), from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                pass
    return found


def descendants(pid: int) -> list[int]:
    children = []
    for entry in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            children += [int(c) for c in entry.read_text().split()]
        except OSError:
            pass
    return children + [d for c in children for d in descendants(c)]


@pytest.mark.slow
def test_ray_worker_killed_mid_run_is_rerun_and_equals_one_task(models, tmp_path):
    """A real Ray cluster on loopback (2 CPUs, 2 tasks at once); one task's worker is SIGKILLed while it scores."""
    pytest.importorskip("ray")
    corpus = tmp_path / "corpus.jsonl"
    n_docs = 120  # one document per shard: enough shards that the kill lands mid-task
    corpus.write_text("".join(json.dumps({"text": f"Document {i}. " + "word " * (5 + i % 11)}) + "\n"
                              for i in range(n_docs)))
    straight = tmp_path / "straight"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as Ray runs a 1-CPU task: a CPU matmul's sums depend on the thread count
    try:
        score(config(corpus, models, straight, shard_size=1))
    finally:
        torch.set_num_threads(threads)

    output = tmp_path / "scores"
    teacher, reference = models
    command = [sys.executable, "-m", "refine", "score", str(corpus), "--teacher", str(teacher), "--reference",
               str(reference), "--output", str(output), "--max-length", "32", "--shard-size", "1", "--device", "cpu",
               "--executor", "ray", "--tasks", "2", "--workers", "2"]
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = []
    reader = threading.Thread(target=lambda: log.extend(driver.stdout), daemon=True)
    reader.start()
    killed, deadline = None, time.time() + 120
    while killed is None and time.time() < deadline and driver.poll() is None:
        n_done = len(list((output / "data").glob("scores-*.parquet"))) if (output / "data").is_dir() else 0
        if n_done >= 10:
            workers = [pid for pid, cmdline in processes().items() if cmdline.startswith("ray::RankWorker")]
            if workers:
                killed = workers[0]
                for pid in [killed, *descendants(killed)]:  # the actor and the pool process scoring for it
                    os.kill(pid, signal.SIGKILL)
                n_at_kill = len(list((output / "data").glob("scores-*.parquet")))
        time.sleep(0.01)
    assert killed is not None, "no Ray worker was found scoring before the run ended:\n" + "".join(log)[-3000:]
    assert n_at_kill < n_docs, "the run finished before the worker could be killed"
    assert driver.wait(timeout=300) == 0, "".join(log)[-3000:]
    reader.join(timeout=10)
    assert "RayActorError" in "".join(log)  # datatrove saw the worker die and ran its task again

    names, table = scores_table(output)
    straight_names, straight_table = scores_table(straight)
    assert names == straight_names
    assert table.equals(straight_table)
    assert not list((output / "data").glob(".*.tmp"))  # the killed task's half-written shard is gone
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["n_instances"] == n_docs and manifest["executor"] == "ray"


def test_executor_options_are_checked_together(tmp_path):
    from refine.config import load_config
    from refine.errors import RefineError

    with pytest.raises(RefineError) as error:
        load_config(ScoreConfig, overrides=dict(data="c.jsonl", teacher="t", reference="r", output=str(tmp_path / "o"),
                                                executor="slurm", nproc=2, workers=0, gpus_per_task=-1))
    message = str(error.value)
    assert "--workers 0 must be at least 1" in message
    assert "--gpus-per-task -1 must be at least 0" in message
    assert "--executor slurm needs --slurm-partition" in message
    assert "--nproc (torchrun) and --tasks/--executor both split the work; choose one" in message


def record_slot(folder: str, task: int, n_tasks: int) -> None:
    """A task that writes down the local executor's slot it ran in."""
    Path(folder, f"{task}").write_text(os.environ[engine.TASK_SLOT_ENV])


def test_local_tasks_hold_distinct_slots_and_take_that_gpu(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import torch

    from refine.distributed import World, rank_device

    cfg = SimpleNamespace(executor="local", tasks=4, workers=2, device="auto")
    engine.run_tasks(cfg, functools.partial(record_slot, str(tmp_path)), tmp_path / "logs")
    slots = [int((tmp_path / f"{task}").read_text()) for task in range(4)]
    assert set(slots) <= {0, 1}
    assert engine.TASK_SLOT_ENV not in os.environ

    # On a machine with 2 GPUs, a task in slot 3 scores on GPU 1; a fixed device is kept; torchrun ranks keep theirs.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv(engine.TASK_SLOT_ENV, "3")
    assert rank_device("auto", World()) == "cuda:1"
    assert rank_device("cpu", World()) == "cpu"
    assert engine.local_workers(SimpleNamespace(workers=None, device="auto")) == 2
