"""The whole GPU check in one command, for the few minutes a GPU is lent:

    python -m research.gpucheck --out DIR              # on a CUDA machine: about 8 minutes
    python -m research.gpucheck --out DIR --dry-run    # the same steps, tiny and on the CPU, to catch typos first

It trains model.py's Net, the default, through train.py.

1. the CUDA tests (tests/test_steps.py);
2. `research.bench --compare graph`: eager against captured steps, whole process and training, alternating;
3. seeds on the test set: 48 of the captured path and 24 of the eager one, each process a
   `python -m research.seeds ...` of its own, 12 seeds a process, all processes at once. Few processes:
   24 at once on one H200 time-sliced the GPU so that a captured run took 95-163 s instead of about
   7 s of training alone. Each process rewrites its seeds.json after every seed, so a deadline keeps
   the seeds done by then; the records are merged into DIR/seeds-cuda.json (captured, the default
   on CUDA) and DIR/seeds-cuda-eager.json, the names of the committed records;
4. one summary table.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import artifacts
import train
from data import DEFAULT_DATA_DIR, DataError, load_mnist
from research.figures import lowest_last
from research.seeds import RECORD, spread
from rules import LAST_EPOCHS, MIN_ACCURACY

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root: train.py's folder
RECORDS = {"cuda-graph": "seeds-cuda.json", "cuda-eager": "seeds-cuda-eager.json"}


def step(title, cmd, log, timeout):
    """Runs cmd, its output to log; returns its exit code (124 when cut off at timeout)."""
    print(f"== {title}: {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        try:
            code = subprocess.run(cmd, cwd=HERE, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = 124
    print(f"   exit {code} after {time.perf_counter() - start:.0f} s; log {log}", flush=True)
    return code


def seeds(paths, flags, out, deadline):
    """Trains each path's seeds, all processes at once; returns {path: merged record or None}."""
    procs = []
    for path, (seed_list, processes) in paths.items():
        for k in range(processes):
            folder = os.path.join(out, "runs", f"{path}-{k}")
            os.makedirs(folder, exist_ok=True)
            cmd = [sys.executable, "-m", "research.seeds", *map(str, seed_list[k::processes]), "--out", folder,
                   *flags[path]]
            log = open(os.path.join(folder, "log.txt"), "w")
            procs.append((path, folder, subprocess.Popen(cmd, cwd=HERE, stdout=log, stderr=subprocess.STDOUT), log))
    print(f"== seeds: {len(procs)} processes, deadline {deadline} s", flush=True)
    start = time.perf_counter()
    for _, _, proc, log in procs:
        try:
            proc.wait(timeout=max(1, deadline - (time.perf_counter() - start)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    print(f"   done after {time.perf_counter() - start:.0f} s", flush=True)
    merged = {}
    for path in paths:
        records = []
        for p, folder, _, _ in procs:
            if p == path and os.path.exists(os.path.join(folder, RECORD)):
                with open(os.path.join(folder, RECORD)) as f:
                    records.append(json.load(f))
        if not records:
            merged[path] = None
            continue
        record = {**records[0], "seeds": sorted((s for r in records for s in r["seeds"]), key=lambda s: s["seed"])}
        artifacts.write_atomic(os.path.join(out, RECORDS[path]), artifacts.json_bytes(record))
        merged[path] = record
    return merged


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=train.writable_dir, required=True, help="directory for the logs and records")
    positive = train.number(int, lambda v: v > 0, "> 0")
    p.add_argument("--graph-seeds", type=positive, help="seeds of the captured path (48; dry run 2)")
    p.add_argument("--eager-seeds", type=positive, help="seeds of the eager path (24; dry run 1)")
    p.add_argument("--seeds-per-process", type=positive, default=12)
    p.add_argument("--deadline", type=positive, default=280, help="seconds for the seeds step")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny and on the CPU: 3 seeds of 1 epoch, no capture, no bench")
    args = p.parse_args()
    args.graph_seeds = args.graph_seeds or (2 if args.dry_run else 48)
    args.eager_seeds = args.eager_seeds or (1 if args.dry_run else 24)
    out = os.path.abspath(args.out)
    try:  # once here, so that the processes find the files extracted, or one line says what is missing
        load_mnist(DEFAULT_DATA_DIR, train=True, device="cpu")
    except DataError as e:
        sys.exit(f"error: {e}")
    common = ["--device", "cpu", "--epochs", "1"] if args.dry_run else ["--device", "cuda"]
    flags = {"cuda-graph": common + ([] if args.dry_run else ["--cuda-graph"]),
             "cuda-eager": common + ["--no-cuda-graph"]}
    counts = {"cuda-graph": args.graph_seeds, "cuda-eager": args.eager_seeds}
    paths = {path: (list(range(1, n + 1)), -(-n // args.seeds_per_process)) for path, n in counts.items()}

    tests = step("CUDA tests", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_steps.py",
                                "-k", "on_cuda" if not args.dry_run else "schedule"],
                 os.path.join(out, "tests.log"), 240)
    bench = (None if args.dry_run else
             step("bench", [sys.executable, "-m", "research.bench", "--compare", "graph", "--rounds", "2"],
                  os.path.join(out, "bench.log"), 240))
    records = seeds(paths, flags, out, args.deadline)

    print(f"\nCUDA tests: exit {tests}" + ("" if bench is None else f"; bench: exit {bench}"))
    if bench is not None and os.path.exists(os.path.join(out, "bench.log")):
        with open(os.path.join(out, "bench.log")) as f:
            print("".join(line for line in f if line.startswith(("|", "captured", "NVIDIA", "H"))), end="")
    print(f"\n| path | seeds | hold {MIN_ACCURACY:.2f} in each of the last {LAST_EPOCHS} | mean lowest of the last "
          f"{LAST_EPOCHS} (sd) | lowest | mean final | mean s/run |\n|---|---:|---:|---:|---:|---:|---:|")
    for path, record in records.items():
        if record is None:
            print(f"| {path} | 0 | | | | | |")
            continue
        rows = record["seeds"]
        lows = [lowest_last(r) for r in rows]
        mean, sd, held = spread(lows)
        print(f"| {path} | {len(rows)} | {held} | {mean:.3f} ({sd:.3f}) "
              f"| {min(lows):.2f} | {statistics.mean(r['final'] for r in rows):.3f} "
              f"| {statistics.mean(r['seconds'] for r in rows):.1f} |")


if __name__ == "__main__":
    main()
