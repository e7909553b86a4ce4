"""``gen3d batch``: many runs of one recipe, each in its own folder, on local workers or Ray.

A batch is a list of runs, each a list of overrides (from ``--inputs`` rows, a ``--sweep`` grid,
or both), plus overrides common to every run. Each run is a ``python -m gen3d run RECIPE
OVERRIDES --out DIR/NAME [--resume]`` process of its own: its own memory and torch threads, and
the trainer's own Ctrl-C handling (it saves a checkpoint and exits 130). The batch's state lives
in ``DIR/batch.json``, rewritten atomically at every change, so the same command run again skips
what is done (and what failed, unless asked to retry it) and resumes what was interrupted.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from .errors import ConfigError, Gen3DError
from .io import write_json

MANIFEST = "batch.json"
LOG = "batch.log"  # each run's own output, appended per attempt, in its folder
NAME_LIMIT = 48  # longer names are cut and end in a hash of the inputs
# On a CPU each worker gets this many torch threads unless --workers/--threads say otherwise;
# workers = cores // threads. One thread a run, a run per core: on 2 cores a reconstruction step
# on one thread takes ~1.5x its time on two (docs/benchmarks.md, the teacher run's 1 vs 2
# threads), so two one-thread runs do ~1.33x the work of one two-thread run, and the serial
# parts of a run (start-up, evaluation, export, previews) overlap with the other run's training.
# benchmarks/bench_batch.py measures 2x1 against 1x2 on a sweep.
DEFAULT_THREADS = 1
RESEND = 5.0  # seconds before a stopping run that has not stopped gets its SIGINT again
INTERRUPTED = (130, -signal.SIGINT)  # gen3d run's exit code after Ctrl-C; a python killed by SIGINT


# --- inputs: rows of overrides -------------------------------------------------------------------

def read_inputs(path: Path) -> list[list[str]]:
    """The runs of an inputs file: CSV (a header of keys, a row a run; an empty cell sets nothing)
    or YAML (a list whose items are mappings of overrides, lists of override strings, or one string
    of overrides split as a shell would)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--inputs: file not found: {path}")
    rows = _read_csv(path) if path.suffix.lower() == ".csv" else _read_yaml(path)
    if not rows:
        raise ConfigError(f"{path}: lists no runs")
    for i, row in enumerate(rows, 1):
        for text in row:
            _check_override(text, f"{path}: run {i}")
    return rows


def _read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: spreadsheets write a BOM
        reader = csv.DictReader(f)
        if not reader.fieldnames or any(not (k or "").strip() for k in reader.fieldnames):
            raise ConfigError(f"{path}: the first line must name a key per column, e.g. seed,prompt")
        rows = []
        for row in reader:
            if None in row:
                raise ConfigError(f"{path}: line {reader.line_num}: more cells than the header has keys")
            cells = [f"{k.strip()}={v.strip()}" for k, v in row.items() if v is not None and v.strip()]
            if cells:
                rows.append(cells)
    return rows


def _read_yaml(path: Path) -> list[list[str]]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(data, list):
        raise ConfigError(f"{path}: expected a list of runs (each a mapping of overrides), got {type(data).__name__}")
    rows = []
    for i, item in enumerate(data, 1):
        if isinstance(item, dict):
            rows.append([f"{k}={_as_override_value(v)}" for k, v in item.items()])
        elif isinstance(item, str):
            rows.append(shlex.split(item))
        elif isinstance(item, list) and all(isinstance(x, str) for x in item):
            rows.append(list(item))
        else:
            raise ConfigError(f"{path}: run {i}: expected a mapping of overrides or override strings, got {item!r}")
    return rows


def _as_override_value(value: Any) -> str:
    """A YAML value written so that ``key=<it>`` reads back as the same value."""
    from .recipe import parse_override

    if isinstance(value, str) and parse_override(f"k={value}")[1] == value:
        return value  # prompt: a red chair -> prompt=a red chair
    return json.dumps(value)  # JSON is YAML: numbers, lists, mappings, and strings like "1" or "yes"


def _check_override(text: str, where: str) -> None:
    from .recipe import parse_override

    try:
        parse_override(text)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def sweep_grid(sweeps: list[str]) -> list[list[str]]:
    """``["seed=0,1", "lr=0.1,0.2"]`` -> every combination, as rows of overrides."""
    axes = []
    for text in sweeps:
        key, sep, values = text.partition("=")
        parts = split_values(values)
        if not sep or not key.strip() or not parts:
            raise ConfigError(f"--sweep {text!r}: expected key=v1,v2,...")
        axes.append([f"{key.strip()}={v}" for v in parts])
    return [list(combo) for combo in itertools.product(*axes)]


def split_values(text: str) -> list[str]:
    """Split at commas outside brackets and quotes: ``[1, 2],[3, 4]`` is two values."""
    values, depth, quote, current = [], 0, "", ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append(current.strip())
            current = ""
            continue
        current += ch
    values.append(current.strip())
    return [v for v in values if v]


# --- run names ----------------------------------------------------------------------------------

def run_name(inputs: list[str]) -> str:
    """A short, filesystem-safe folder name from a run's own overrides: ``seed-0``,
    ``prompt-a-red-chair``, ``path-data-lego_seed-1`` (the last part of each key, then its value)."""
    parts = [_slug(f"{key.split('.')[-1]}-{value}") for key, _, value in (t.partition("=") for t in inputs)]
    name = "_".join(p for p in parts if p) or "run"
    if len(name) > NAME_LIMIT:
        name = f"{name[:NAME_LIMIT - 9].rstrip('-_.')}-{_digest(inputs)}"
    return name


def _slug(text: str) -> str:
    """Lower-case letters, digits and dashes; a dot only inside a word (``0.05``), never ``..``."""
    words = "".join(ch if ch.isascii() and (ch.isalnum() or ch == ".") else " " for ch in text.lower()).split()
    return "-".join(w for w in (w.strip(".") for w in words) if w)


def _digest(inputs: list[str]) -> str:
    return hashlib.sha1("\n".join(inputs).encode()).hexdigest()[:8]


def unique_names(rows: list[list[str]]) -> list[str]:
    """``run_name`` of each row; names that collide all get a hash of their inputs."""
    names = [run_name(row) for row in rows]
    counts = Counter(names)
    names = [n if counts[n] == 1 else f"{n[:NAME_LIMIT - 9].rstrip('-_.')}-{_digest(row)}"
             for n, row in zip(names, rows)]
    seen: dict[str, int] = {}
    for i, (name, row) in enumerate(zip(names, rows), 1):
        if name in seen:
            raise ConfigError(f"runs {seen[name]} and {i} have the same inputs ({' '.join(row)}); list each run once")
        seen[name] = i
    return names


# --- the plan and the manifest ------------------------------------------------------------------

@dataclass
class BatchConfig:
    """What ``gen3d batch`` was asked for."""

    recipe: Path
    out: Path
    inputs: Path | None = None
    sweeps: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)  # applied to every run, before its own
    engine: str = "local"  # local | ray
    workers: int | None = None
    threads: int | None = None
    ray_address: str | None = None
    memory_gb: float = 2.0  # what a run is taken to need: a Ray task declares it; caps the local pool
    retry_failed: bool = False
    quiet: bool = False


def plan_runs(config: BatchConfig) -> list[dict[str, Any]]:
    """The manifest entries of the batch's runs, all queued: the inputs rows times the sweep grid."""
    if config.inputs is None and not config.sweeps:
        raise ConfigError("no runs: give them with --inputs FILE and/or --sweep key=v1,v2,...")
    for text in config.overrides:
        _check_override(text, "command line")
    rows = read_inputs(config.inputs) if config.inputs is not None else [[]]
    grid = sweep_grid(config.sweeps) if config.sweeps else [[]]
    runs = [row + combo for row in rows for combo in grid]
    return [{"name": name, "folder": name, "overrides": [*config.overrides, *own], "state": "queued",
             "error": None, "metrics": None, "seconds": None}
            for name, own in zip(unique_names(runs), runs)]


class Manifest:
    """``DIR/batch.json``: written whole and atomically at every change (worker threads share it)."""

    def __init__(self, path: Path, data: dict[str, Any]):
        self.path, self.data = path, data
        self.lock = threading.RLock()
        self.by_name = {run["name"]: run for run in data["runs"]}

    @classmethod
    def open(cls, out: Path, recipe: str, engine: str, runs: list[dict[str, Any]],
             retry_failed: bool = False) -> "Manifest":
        """This batch's manifest, carrying over the state of runs an earlier call finished: done
        (if its metrics.json is still there) and failed (unless ``retry_failed``). Runs that were
        queued or running start again (a running one was cut off: it resumes)."""
        path = out / MANIFEST
        old = json.loads(path.read_text()) if path.is_file() else {"recipe": recipe, "runs": []}
        if old.get("recipe") != recipe:
            raise ConfigError(f"{path}: this folder holds a batch of {old.get('recipe')}, not {recipe}; "
                              "pick another --out")
        before = {run["name"]: run for run in old.get("runs", [])}
        for run in runs:
            prior = before.get(run["name"])
            if prior is None:
                continue
            if prior["overrides"] != run["overrides"]:
                now = [o for o in run["overrides"] if o not in prior["overrides"]] or ["the same, in another order"]
                then = [o for o in prior["overrides"] if o not in run["overrides"]] or ["-"]
                raise ConfigError(f"{path}: run {run['name']!r} was made with other overrides (now {' '.join(now)}; "
                                  f"then {' '.join(then)}); pick another --out")
            run["seconds"] = prior.get("seconds")
            if prior.get("state") == "done" and (out / run["folder"] / "metrics.json").is_file():
                run.update(state="done", metrics=prior.get("metrics"))
            elif prior.get("state") == "failed" and not retry_failed:
                run.update(state="failed", error=prior.get("error"))
        manifest = cls(path, {"recipe": recipe, "engine": engine, "runs": runs})
        manifest.save()
        return manifest

    def update(self, name: str, **changes: Any) -> None:
        with self.lock:
            self.by_name[name].update(changes)
            self.save()

    def save(self) -> None:
        with self.lock:
            write_json(self.path, self.data)

    def count(self, state: str) -> int:
        return sum(run["state"] == state for run in self.data["runs"])


def validate(recipe: Path, runs: list[dict[str, Any]]) -> None:
    """Load every queued run's recipe before any starts; a bad one is marked failed with its one line."""
    from .api import load_recipe

    for run in runs:
        if run["state"] != "queued":
            continue
        try:
            load_recipe(recipe, run["overrides"])
        except Gen3DError as exc:
            run.update(state="failed", error=str(exc))


def read_metrics(folder: Path) -> dict[str, Any] | None:
    """A run's metrics.json without its bulky ``timeline`` lists (at any depth: stages have them)."""
    path = folder / "metrics.json"
    if not path.is_file():
        return None

    def trim(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: trim(v) for k, v in value.items() if k != "timeline"}
        return value

    return trim(json.loads(path.read_text()))


def has_progress(folder: Path) -> bool:
    """Whether ``gen3d run`` would need ``--resume`` here: a checkpoint or metrics, own or a stage's."""
    marks = ("checkpoints/last.safetensors", "metrics.json")
    return any((folder / m).is_file() for m in marks) or any(
        any((folder / "stages").glob(f"*/{m}")) for m in marks)


# --- running one run ------------------------------------------------------------------------------

@dataclass
class Job:
    """One ``gen3d run`` to do: the command line (without the python) and where."""

    name: str
    folder: Path
    args: list[str]
    cwd: str
    env: dict[str, str]


def make_job(recipe: Path, out: Path, run: dict[str, Any], threads: int) -> Job:
    folder = (out / run["folder"]).resolve()
    args = ["-m", "gen3d", "run", str(recipe.resolve()), *run["overrides"], "--out", str(folder)]
    if has_progress(folder):
        args.append("--resume")
    # Each worker's torch uses its share of the cores, never all of them (no oversubscription).
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return Job(run["name"], folder, args, os.getcwd(), env)


def run_process(args: list[str], cwd: str, env: dict[str, str], folder: Path,
                stop: Callable[[], int] = lambda: 0, keep_fds: tuple[int, ...] = ()) -> dict[str, Any]:
    """Run ``python ARGS`` with its output appended to ``folder/batch.log``. When ``stop()`` turns
    1 (or a Ray cancel raises KeyboardInterrupt here) the run gets one SIGINT: it saves a checkpoint
    and exits; at 2 it is killed. Returns {"code", "interrupted", "error"}.

    The run gets a session of its own, so a Ctrl-C in the terminal reaches only the batch, which
    passes on one SIGINT (and repeats it only if the run is still going RESEND s later): a burst
    of them could land during the checkpoint write."""
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / LOG
    with open(log, "ab") as out:
        start = out.tell()
        out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} python {shlex.join(args)}\n".encode())
        out.flush()
        proc = subprocess.Popen([sys.executable, *args], cwd=cwd, env={**os.environ, **env}, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                pass_fds=keep_fds)
        sent, sent_at = 0, 0.0
        while True:
            try:
                code = proc.wait(timeout=0.25)
                break
            except subprocess.TimeoutExpired:
                level = stop()
            except KeyboardInterrupt:
                level = sent + 1
            if level >= 2 and sent < 2:
                proc.kill()
                sent = 2
            elif level >= 1 and (sent < 1 or (sent == 1 and time.monotonic() - sent_at > RESEND)):
                # Again after RESEND s: a SIGINT that lands while the run is still importing can be
                # swallowed by a library's bare except, and the run would go on to its end.
                proc.send_signal(signal.SIGINT)
                sent, sent_at = 1, time.monotonic()
    interrupted = code != 0 and (sent > 0 or code in INTERRUPTED)  # 0: it finished before the signal
    error = None if code == 0 or interrupted else _error_line(log, start, code)
    return {"code": code, "interrupted": interrupted, "error": error}


def _error_line(log: Path, start: int, code: int) -> str:
    """The one-line error a failed ``gen3d run`` printed, else its last line of output."""
    with open(log, "rb") as f:
        f.seek(start)
        lines = [line.strip() for line in f.read().decode(errors="replace").splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("gen3d: error: "):
            return line[len("gen3d: error: "):]
    last = lines[-1] if len(lines) > 1 else "no output"
    return f"{last} (exit code {code}; see {log})"


# --- engines ------------------------------------------------------------------------------------

def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what this process may use, not the whole machine
    except AttributeError:
        return os.cpu_count() or 1


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def available_memory_gb() -> float | None:
    """MemAvailable from /proc/meminfo (Linux), else None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def size_pool(pending: int, workers: int | None, threads: int | None, cores: int, gpus: int,
              memory_slots: int | None = None) -> tuple[int, int]:
    """(workers, torch threads per worker): one worker per GPU, or on a CPU workers x threads <= cores
    and no more workers than ``memory_slots`` (runs the free memory holds). Never more workers than
    runs to do; spare cores then go to the workers' threads."""
    pending = max(1, pending)
    if gpus:
        workers = min(workers or gpus, pending)
        return workers, threads or max(1, cores // workers)
    if workers is None:
        workers = max(1, min(cores // (threads or DEFAULT_THREADS), memory_slots or cores))
    workers = min(workers, pending)
    return workers, threads or max(1, cores // workers)


class LocalEngine:
    """A pool of worker processes on this machine: each a ``gen3d run`` subprocess."""

    name = "local"

    def __init__(self, workers: int, threads: int, gpus: int, lock_fd: int | None = None):
        self.workers, self.threads, self.gpus, self.lock_fd = workers, threads, gpus, lock_fd

    def execute(self, job: Job, slot: int, stop: Callable[[], int]) -> dict[str, Any]:
        env = dict(job.env)
        if self.gpus:  # worker slot i always drives GPU i (mod the count)
            env["CUDA_VISIBLE_DEVICES"] = str(slot % self.gpus)
        # The run holds the batch's lock too: should the batch die, no new batch starts on its folder
        # while the run is still going.
        keep = (self.lock_fd,) if self.lock_fd is not None else ()
        return run_process(job.args, job.cwd, env, job.folder, stop, keep_fds=keep)

    def close(self) -> None:
        pass


def _ray_task(args: list[str], cwd: str, env: dict[str, str], folder: str) -> dict[str, Any]:
    """The Ray task of one run, on whichever node Ray picks: the same subprocess as locally. It stops
    when the driver drops a ``.stop`` file in the run folder (the filesystem is shared anyway)."""
    stop_file = Path(folder) / ".stop"
    return run_process(args, cwd, env, Path(folder), lambda: 1 if stop_file.exists() else 0)


class RayEngine:
    """Each run a Ray task declaring its CPUs, GPU and memory, on a cluster (``address``) or on a
    local Ray started for the batch. ``--out`` must be a path every node sees (a shared filesystem)."""

    name = "ray"

    def __init__(self, address: str | None, threads: int | None, workers: int | None, memory_gb: float,
                 pending: int, want_gpu: bool):
        if not address and "ray" not in sys.modules:
            # A Ray started just for this batch serves this machine only: Ray then binds to loopback
            # instead of the machine's network address (read once, when ray is first imported).
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        try:
            import ray
        except ImportError:
            raise Gen3DError("--engine ray needs Ray: pip install 'gen3d[ray]' (or pip install ray)") from None
        self.ray = ray
        self.started = not ray.is_initialized()  # a caller (a test, a notebook) may have started it
        if self.started:
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(num_cpus=cpu_count(), include_dashboard=False, log_to_driver=False,
                         logging_level=logging.WARNING)
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0)) if want_gpu else 0
        self.gpus_per_run = 1 if gpus else 0
        self.threads = threads or DEFAULT_THREADS
        capacity = gpus or max(1, int(resources.get("CPU", 1)) // self.threads)
        self.workers = max(1, min(workers or capacity, pending))
        self.memory = int(memory_gb * 2**30)
        self.remote = ray.remote(_ray_task)

    def execute(self, job: Job, slot: int, stop: Callable[[], int]) -> dict[str, Any]:
        ray = self.ray
        job.folder.mkdir(parents=True, exist_ok=True)
        stop_file = job.folder / ".stop"
        stop_file.unlink(missing_ok=True)
        ref = self.remote.options(num_cpus=self.threads, num_gpus=self.gpus_per_run, memory=self.memory,
                                  max_retries=0).remote(job.args, job.cwd, job.env, str(job.folder))
        cancelled = False
        while True:
            ready, _ = ray.wait([ref], timeout=0.25)
            if ready:
                break
            level = stop()
            if level >= 1 and not stop_file.exists():
                stop_file.touch()  # the task SIGINTs its run, which saves a checkpoint and exits
            if level >= 2 and not cancelled:
                ray.cancel(ref, force=True)
                cancelled = True
        try:
            return ray.get(ref)
        except Exception as exc:  # the task died: a node lost, out of memory, cancelled
            interrupted = stop() > 0
            why = f"Ray task failed: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
            return {"code": None, "interrupted": interrupted, "error": None if interrupted else why}
        finally:
            stop_file.unlink(missing_ok=True)

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


# --- the batch ----------------------------------------------------------------------------------

def run_batch(config: BatchConfig) -> dict[str, Any]:
    """Run the batch (or what is left of it); returns the manifest. Raises BatchInterrupted after
    Ctrl-C, once every running run has stopped (saving its checkpoint)."""
    recipe, out = Path(config.recipe), Path(config.out)
    if not recipe.is_file():
        raise ConfigError(f"recipe file not found: {recipe}")
    if config.engine not in ("local", "ray"):
        raise ConfigError(f"--engine: expected local or ray, got {config.engine!r}")
    runs = plan_runs(config)
    out.mkdir(parents=True, exist_ok=True)
    interrupted = False
    with _exclusive(out) as lock:
        manifest = Manifest.open(out, os.path.normpath(config.recipe), config.engine, runs, config.retry_failed)
        validate(recipe, manifest.data["runs"])
        manifest.save()
        todo = [run for run in manifest.data["runs"] if run["state"] == "queued"]
        if todo:
            engine = _engine(config, recipe, todo, lock.file.fileno())
            try:
                jobs = [make_job(recipe, out, run, engine.threads) for run in todo]
                interrupted = _schedule(manifest, jobs, engine, config.quiet)
            finally:
                engine.close()
        _write_index(out, manifest.data)
    if interrupted:
        raise BatchInterrupted(f"interrupted; the running runs stopped (at a checkpoint, those that had begun "
                               f"training). Run the same command again to continue ({out / MANIFEST})")
    return manifest.data


class BatchInterrupted(Gen3DError):
    """Ctrl-C during a batch: the runs saved their checkpoints; the same command continues."""


def _engine(config: BatchConfig, recipe: Path, todo: list[dict[str, Any]], lock_fd: int):
    from .api import load_recipe

    want_gpu = load_recipe(recipe, todo[0]["overrides"]).settings.device != "cpu"
    if config.engine == "ray":
        return RayEngine(config.ray_address, config.threads, config.workers, config.memory_gb, len(todo), want_gpu)
    gpus = gpu_count() if want_gpu else 0
    memory = available_memory_gb()
    slots = int(memory // config.memory_gb) if memory and config.memory_gb > 0 else None
    workers, threads = size_pool(len(todo), config.workers, config.threads, cpu_count(), gpus, slots)
    return LocalEngine(workers, threads, gpus, lock_fd)


class _exclusive:
    """A lock on ``DIR/.batch.lock``: two batches into one folder would run the same runs twice."""

    def __init__(self, out: Path):
        self.path = out / ".batch.lock"

    def __enter__(self):
        self.file = open(self.path, "a")  # "a": never rewritten, so never looks changed
        try:
            import fcntl

            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:
            pass  # no flock (Windows): trust the user
        except OSError:
            self.file.close()
            raise Gen3DError(f"another gen3d batch is running into {self.path.parent}; wait for it or pick "
                             "another --out") from None
        return self

    def __exit__(self, *exc):
        self.file.close()


def _schedule(manifest: Manifest, jobs: list[Job], engine, quiet: bool) -> bool:
    """Run the jobs on ``engine.workers`` worker threads (each drives one run at a time); returns
    whether the batch was interrupted. A first Ctrl-C lets every running run checkpoint and stop,
    a second kills them (their last periodic checkpoint stays)."""
    from tqdm import tqdm

    total = len(manifest.data["runs"])
    finished = manifest.count("done") + manifest.count("failed")  # failed: did not validate
    bar = tqdm(total=total, initial=finished, unit="run", desc="batch", disable=quiet,
               dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 15.0, file=sys.stderr)
    queue = list(reversed(jobs))
    level = [0]  # 0 running, 1 stopping, 2 killing: read by every worker

    def show() -> None:
        bar.set_postfix_str(f"done {manifest.count('done')}, running {manifest.count('running')}, "
                            f"failed {manifest.count('failed')}", refresh=False)
        bar.update(0)  # redraws at most every mininterval: one line a change on a terminal, few in a log

    def worker(slot: int) -> None:
        while level[0] == 0:
            with manifest.lock:
                if not queue:
                    return
                job = queue.pop()
                manifest.update(job.name, state="running", error=None)
                show()
            began = time.monotonic()
            try:
                result = engine.execute(job, slot, lambda: level[0])
            except Exception as exc:  # could not even start it (no such cwd, ...): that run fails, not the batch
                result = {"code": None, "interrupted": False, "error": f"{type(exc).__name__}: {exc}"}
            seconds = round((manifest.by_name[job.name]["seconds"] or 0.0) + time.monotonic() - began, 2)
            with manifest.lock:
                if result["interrupted"]:
                    manifest.update(job.name, state="queued", seconds=seconds)
                elif result["error"] is None:
                    manifest.update(job.name, state="done", metrics=read_metrics(job.folder), seconds=seconds)
                    bar.update(1)
                else:
                    manifest.update(job.name, state="failed", error=result["error"], seconds=seconds)
                    bar.update(1)
                show()

    show()
    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(engine.workers)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        try:
            time.sleep(0.25)  # not join(): a join cut by Ctrl-C can leave is_alive() wrong
        except KeyboardInterrupt:
            level[0] = min(2, level[0] + 1)
            bar.write("gen3d batch: " + ("stopping: each running run saves a checkpoint (Ctrl-C again to kill)"
                                         if level[0] == 1 else "killing the running runs"), file=sys.stderr)
    bar.close()
    return level[0] > 0


def _write_index(out: Path, manifest: dict[str, Any]) -> None:
    """The batch's results page, when gen3d.report is there (it is optional to the batch)."""
    try:
        from .report import write_index
    except ImportError:
        return
    try:
        write_index(out, manifest)
    except Exception as exc:  # the page is a view of batch.json: never lose the batch over it
        warnings.warn(f"{out / 'index.html'} was not written: {exc}", stacklevel=2)
