"""Benchmark of ``gen3d batch``: a sweep's wall time against the same runs one by one, as JSON.

    python benchmarks/bench_batch.py                              # seeds 0-3, max_seconds=20, pools 2x1 and 1x2
    python benchmarks/bench_batch.py --pools 2x1 --skip-single    # one pool shape (workers x threads) only
    python benchmarks/bench_batch.py --sigint-after 30            # also: Ctrl-C the batch at 30 s, run it again
    python benchmarks/bench_batch.py --json out.json -- steps=300 # any recipe override after --

Single runs: ``gen3d run RECIPE seed=S OVERRIDES`` one after another, each with the machine to itself
(torch's default threads). Batch: ``gen3d batch RECIPE --sweep seed=... OVERRIDES --workers W
--threads T``. Reported: each single run's wall time and its own training + export seconds (from
metrics.json), the batch's wall time and its ratio to the sum of the single runs' training + export
seconds (the issue's target: at most 1.15) and to the sum of their wall times, PSNR and steps per seed
both ways, and the peak resident memory of the whole process tree (every worker together).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class PeakMemory:
    """Samples the resident memory of a process and all its children, summed, every 0.2 s."""

    def __init__(self, pid: int):
        import psutil

        self.root, self.peak, self.done = psutil.Process(pid), 0, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        import psutil

        while not self.done.wait(0.2):
            try:
                procs = [self.root, *self.root.children(recursive=True)]
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, total)
            except psutil.Error:
                return

    def stop(self) -> float:
        self.done.set()
        self.thread.join()
        return round(self.peak / 2**20, 1)


def timed(argv: list[str], interrupt_after: float | None = None) -> dict:
    """Run a command; its wall seconds, exit code and peak memory (MB) of its process tree."""
    began = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    memory = PeakMemory(proc.pid)
    try:
        proc.wait(timeout=interrupt_after)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
    stderr = proc.communicate()[1]
    result = {"seconds": round(time.perf_counter() - began, 2), "code": proc.returncode,
              "peak_rss_mb": memory.stop()}
    if proc.returncode not in (0, 130):
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{stderr[-3000:]}")
    return result


def single_runs(recipe: Path, seeds: list[str], overrides: list[str], out: Path) -> dict:
    runs = {}
    for seed in seeds:
        folder = out / f"single-{seed}"
        run = timed([sys.executable, "-m", "gen3d", "run", str(recipe), f"seed={seed}", *overrides, "--quiet",
                     "--out", str(folder)])
        m = json.loads((folder / "metrics.json").read_text())
        runs[seed] = {"wall_seconds": run["seconds"], "train_seconds": m["train_seconds"],
                      "export_seconds": m["export_seconds"], "steps": m["steps"], "psnr_test": m["psnr_test"],
                      "peak_rss_mb": run["peak_rss_mb"]}
        print(f"single seed={seed}: {runs[seed]}", file=sys.stderr)
    return runs


def batch(recipe: Path, seeds: list[str], overrides: list[str], out: Path, workers: int, threads: int,
          interrupt_after: float | None = None) -> dict:
    argv = [sys.executable, "-m", "gen3d", "batch", str(recipe), "--sweep", "seed=" + ",".join(seeds), *overrides,
            "--out", str(out), "--workers", str(workers), "--threads", str(threads), "--quiet"]
    parts = [timed(argv, interrupt_after)]
    if interrupt_after is not None:  # cut by Ctrl-C: the same command again finishes it
        cut = json.loads((out / "batch.json").read_text())
        parts[0]["states_after_cut"] = {r["name"]: r["state"] for r in cut["runs"]}
        parts.append(timed(argv))
    manifest = json.loads((out / "batch.json").read_text())
    runs = {r["name"].removeprefix("seed-"): r for r in manifest["runs"]}
    result = {"pool": f"{workers}x{threads}", "wall_seconds": round(sum(p["seconds"] for p in parts), 2),
              "peak_rss_mb": max(p["peak_rss_mb"] for p in parts),
              "states": {s: r["state"] for s, r in runs.items()},
              "psnr_test": {s: (r["metrics"] or {}).get("psnr_test") for s, r in runs.items()},
              "steps": {s: (r["metrics"] or {}).get("steps") for s, r in runs.items()},
              "train_seconds": {s: (r["metrics"] or {}).get("train_seconds") for s, r in runs.items()}}
    if interrupt_after is not None:
        result["interrupted_at_seconds"] = interrupt_after
        result["parts"] = parts
        result["attempts"] = {s: (out / r["folder"] / "batch.log").read_text().count("python -m gen3d run")
                              for s, r in runs.items()}
        result["resumed"] = {s: "resumed from" in (out / r["folder"] / "batch.log").read_text()
                             for s, r in runs.items()}
        result["temp_files_left"] = [str(p.relative_to(out)) for p in out.rglob(".*") if p.name != ".batch.lock"]
    print(f"batch {result['pool']}: {result}", file=sys.stderr)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "nerf-reconstruct.yaml")
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument("--max-seconds", type=float, default=20)
    parser.add_argument("--pools", default="2x1,1x2", help="workers x threads shapes to run, comma-separated")
    parser.add_argument("--skip-single", action="store_true", help="no single runs (no ratio)")
    parser.add_argument("--sigint-after", type=float, help="also run the first pool cut by SIGINT after this many s")
    parser.add_argument("--keep", type=Path, help="keep the run folders here")
    parser.add_argument("--json", type=Path, help="write the result here too")
    parser.add_argument("overrides", nargs="*", help="recipe overrides (after --)")
    args = parser.parse_args()
    seeds = args.seeds.split(",")
    overrides = [f"max_seconds={args.max_seconds:g}", *args.overrides]
    pools = [tuple(int(x) for x in p.split("x")) for p in args.pools.split(",") if p]
    with tempfile.TemporaryDirectory() as tmp:
        out = args.keep or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        report: dict = {"recipe": str(args.recipe.relative_to(ROOT) if args.recipe.is_relative_to(ROOT) else args.recipe),
                        "seeds": seeds, "overrides": overrides}
        if not args.skip_single:
            single = single_runs(args.recipe, seeds, overrides, out)
            report["single"] = single
            report["sum_single_train_export_seconds"] = round(
                sum(r["train_seconds"] + r["export_seconds"] for r in single.values()), 2)
            report["sum_single_wall_seconds"] = round(sum(r["wall_seconds"] for r in single.values()), 2)
        report["batch"] = []
        for workers, threads in pools:
            result = batch(args.recipe, seeds, overrides, out / f"batch-{workers}x{threads}", workers, threads)
            if not args.skip_single:
                result["ratio_to_single_train_export"] = round(
                    result["wall_seconds"] / report["sum_single_train_export_seconds"], 3)
                result["ratio_to_single_wall"] = round(result["wall_seconds"] / report["sum_single_wall_seconds"], 3)
            report["batch"].append(result)
        if args.sigint_after is not None:
            workers, threads = pools[0]
            report["sigint"] = batch(args.recipe, seeds, overrides, out / f"sigint-{workers}x{threads}", workers,
                                     threads, interrupt_after=args.sigint_after)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
