"""Time to the first RL step, cold vs warm persistent compilation cache (`rema_jax.compile_cache`).

Runs the same command twice, back to back, each with a fresh ``--workdir`` and both with one fresh
``--compilation_cache`` directory: the first run compiles everything and fills the cache (cold), the
second reads it (warm).

    python launch/train.py --config=configs/rl_from_base.py --config.loop.steps=1 \\
        --config.loop.eval_before=False --workdir=<fresh> --compilation_cache=<fresh, shared>

"First step" is measured from just before the process starts to when step 1's line appears in
``metrics.jsonl`` (polled every 50 ms; the trainer appends it at the end of the step, before the
checkpoint). Also reported: the whole process wall time, the trainer's ``time/step_s`` and the
sampler's compile seconds ``time/rollout_compile_s``, and what the cache holds after the cold run.

    python benchmarks/compile_cache.py                       # the pair above
    python benchmarks/compile_cache.py --config=configs/rl_from_base.py --set loop.questions_per_step=2
The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.strip().lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def cache_stats(directory: str) -> dict:
    files = [os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs if f.endswith("-cache")]
    return {"entries": len(files), "bytes": sum(os.path.getsize(f) for f in files)}


def run_once(args, workdir: str, cache_dir: str, log_path: str) -> dict:
    cmd = [
        sys.executable,
        os.path.join(REPO_ROOT, "launch", "train.py"),
        f"--config={args.config}",
        "--config.loop.steps=1",
        "--config.loop.eval_before=False",
        f"--workdir={workdir}",
        f"--compilation_cache={cache_dir}",
    ] + [f"--config.{kv}" for kv in args.set]
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    first_step_s = None
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            if first_step_s is None and os.path.exists(metrics_path) and os.path.getsize(metrics_path):
                first_step_s = time.perf_counter() - t0
            time.sleep(0.05)
        wall_s = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"run failed (exit {proc.returncode}); see {log_path}:\n" + open(log_path).read()[-3000:])
    with open(metrics_path) as f:
        m = json.loads(f.readline())
    return {
        "first_step_s": round(first_step_s if first_step_s is not None else wall_s, 2),
        "process_wall_s": round(wall_s, 2),
        "step_s": round(m["time/step_s"], 2),
        "rollout_compile_s": round(m["time/rollout_compile_s"], 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/rl_from_base.py")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="extra --config.KEY=VALUE for both runs"
    )
    p.add_argument("--keep", action="store_true", help="keep the work and cache directories")
    args = p.parse_args()

    root = tempfile.mkdtemp(prefix="rema_compile_cache_bench_")
    cache_dir = os.path.join(root, "xla")
    results = {}
    for name in ("cold", "warm"):
        results[name] = run_once(args, os.path.join(root, name), cache_dir, os.path.join(root, f"{name}.log"))
        if name == "cold":
            results["cache_after_cold"] = cache_stats(cache_dir)
        print(
            f"{name}: first step at {results[name]['first_step_s']:.1f}s from process start "
            f"(step {results[name]['step_s']:.1f}s, sampler compile {results[name]['rollout_compile_s']:.1f}s, "
            f"process {results[name]['process_wall_s']:.1f}s)",
            flush=True,
        )
    cold, warm = results["cold"]["first_step_s"], results["warm"]["first_step_s"]
    results.update(
        ratio=round(cold / warm, 2), cpu=cpu_model(), cpus=os.cpu_count(), config=args.config, overrides=args.set
    )
    import jax  # only for the versions; the runs above are separate processes

    results.update(jax=jax.__version__, backend=os.environ.get("JAX_PLATFORMS") or "default")
    print(
        f"cache after the cold run: {results['cache_after_cold']['entries']} entries, "
        f"{results['cache_after_cold']['bytes'] / 2**20:.1f} MiB"
    )
    print(
        f"cold {cold:.1f}s, warm {warm:.1f}s to the end of step 1: {cold / warm:.2f}x ({results['cpu']}, "
        f"{os.cpu_count()} CPUs)"
    )
    if args.keep:
        results["dir"] = root
    else:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
