"""Host memory of one RL update (and one SFT step) at the main command's shapes, per variant.

Each variant runs in its own child process (a fresh heap), on random weights of SmolLM2-135M's shape
(the memory does not depend on the values): the ``rl`` section of configs/default.py gives the rows
of one micro-batch × ``loop.max_seq_len`` and the loss positions; the learner's real jitted update
(LoRA on both agents, one trained) runs twice. Reported per variant, in MiB: the RSS once the state is
built, the peak while compiling, the peak while running (the kernel's high-water mark is reset
between phases through ``/proc/self/clear_refs``), and XLA's own ``memory_analysis`` of the
executable (temporaries = the scratch the update allocates on top of its arguments).

    python benchmarks/update_memory.py                          # base and chunk0
    python benchmarks/update_memory.py --variants unrolled base   # the layers unrolled vs scanned
    python benchmarks/update_memory.py --variants base noremat micro1 chunk0+micro1

Variants: ``base`` (configs/default.py's RL section as is: remat on, layers in one scan, logits in
chunks of 16 loss positions, 2 micro-batches), ``noremat`` (``model.remat=False``), ``unrolled``
(``model.scan_layers=False``), ``chunkN`` (``model.logits_chunk=N``;
0 = one ``[B, K, V]`` block), ``microN`` (``update.num_micro_batches=N``, which changes the float
summation order), combinations with ``+``.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

SMOLLM2 = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    tie_word_embeddings=True,
    rope_theta=100000.0,
)


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _hwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _variant_config(variant: str):
    from configs import default

    rl = default.get_config().rl
    rl.loop.eval_questions = 0
    for part in variant.split("+"):
        if part == "base":
            continue
        if part == "noremat":
            rl.model.remat = False
        elif part == "unrolled":
            rl.model.scan_layers = False
        elif part.startswith("chunk"):
            rl.model.logits_chunk = int(part[len("chunk") :])
        elif part.startswith("micro"):
            rl.update.num_micro_batches = int(part[len("micro") :])
        else:
            raise SystemExit(f"unknown variant part {part!r}")
    return rl


def child(variant: str, what: str) -> dict:
    import jax
    import numpy as np

    from rema_jax import rl as rl_lib
    from rema_jax.models.testing import random_params, tiny_config
    from rema_jax.rl.batch import TrainBatch
    from rema_jax.training.config import load_train_config
    from rema_jax.training.layout import AgentLayout
    from rema_jax.training.learner import Learner

    cfg = load_train_config(_variant_config(variant))
    mc = tiny_config(
        **SMOLLM2,
        eos_token_ids=(2,),
        remat=cfg.model.remat,
        logits_chunk=cfg.model.logits_chunk,
        scan_layers=cfg.model.scan_layers,
    )
    base = random_params(mc, jax.random.key(0), std=0.02)
    layout = AgentLayout.from_train_config(cfg)
    trainable = layout.init_trainable(mc, base, cfg.adapter, jax.random.key(1))
    constants = layout.constants(base, trainable, warm_started=True)
    learner = Learner(cfg, layout, mc, trainable, constants)
    rows = cfg.rows_per_step
    role = "reasoning" if what == "rl" else "meta_thinking"
    n, t, k = rows[role], cfg.loop.max_seq_len, learner.max_loss_tokens
    rng = np.random.default_rng(0)
    prompt = t - k
    tokens = rng.integers(3, mc.vocab_size, (n, t)).astype(np.int32)
    attn = np.ones((n, t), np.int32)
    loss = np.zeros((n, t), np.float32)
    loss[:, prompt:] = 1.0
    batch = TrainBatch(
        tokens=tokens,
        attention_mask=attn,
        loss_mask=loss,
        turn_ids=np.where(loss > 0, 0, -1).astype(np.int32),
        advantages=rng.normal(size=(n, t)).astype(np.float32) * loss,
        old_logprobs=np.full((n, t), -10.0, np.float32) * loss,
    )
    out = {"variant": variant, "rows": n, "seq": t, "loss_positions": k, "micro": cfg.update.num_micro_batches}
    out["rss_setup_mib"] = _rss_mib()
    out["hwm_setup_mib"] = _hwm_mib()
    _reset_hwm()
    # the same executable the learner runs (its jit), lowered here to read XLA's memory analysis
    sel = {role: rl_lib.check_update_batch(batch, role, cfg.loss, cfg.update)}
    t0 = time.perf_counter()
    compiled = learner.update_fn.jitted.lower(learner.state, sel, (role,), learner.constants).compile()
    out["compile_s"] = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    if ma is not None:
        out["xla_temp_mib"] = ma.temp_size_in_bytes / 2**20
        out["xla_args_mib"] = ma.argument_size_in_bytes / 2**20
        out["xla_out_mib"] = ma.output_size_in_bytes / 2**20
    out["hwm_compile_mib"] = _hwm_mib()
    out["rss_after_compile_mib"] = _rss_mib()
    if os.environ.get("UPDATE_MEMORY_COMPILE_ONLY"):
        return out
    _reset_hwm()
    t0 = time.perf_counter()
    metrics = []
    for _ in range(2):
        m = learner.update({role: batch}, (role,))
        metrics.append({k2: m[k2] for k2 in ("loss", "grad_norm")})
    out["run_s"] = (time.perf_counter() - t0) / 2
    out["hwm_run_mib"] = _hwm_mib()
    out["rss_after_run_mib"] = _rss_mib()
    out["metrics"] = metrics
    out["ru_maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", nargs="+", default=["base", "chunk0"])
    ap.add_argument("--what", choices=("rl",), default="rl")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.what)), flush=True)
        return
    results = []
    for v in args.variants:
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--child", v, "--what", args.what],
            capture_output=True,
            text=True,
        )
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            results.append({"variant": v, "error": proc.returncode})
            continue
        r = json.loads(line[len("RESULT ") :])
        results.append(r)
        print(
            f"{v:<16} rows {r['rows']}x{r['seq']} micro {r['micro']}: setup {r['rss_setup_mib']:.0f} MiB, "
            f"compile peak {r['hwm_compile_mib']:.0f}, run peak {r['hwm_run_mib']:.0f}, "
            f"XLA temp {r.get('xla_temp_mib', float('nan')):.0f}; compile {r['compile_s']:.0f} s, "
            f"step {r['run_s']:.1f} s; loss {r['metrics'][0]['loss']:.6g} grad_norm {r['metrics'][0]['grad_norm']:.6g}",
            flush=True,
        )
    print(json.dumps({"cpu": _cpu_model(), "results": results}))


if __name__ == "__main__":
    main()
