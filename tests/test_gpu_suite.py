"""benchmarks/gpu_suite.py: its --smoke run (the accelerator suite's code paths on tiny shapes, CPU)
reports every stage's figures as finite positive numbers, and a stage over its limit is reported as
skipped with the reason instead of failing the run."""

import importlib.util
import json
import math
import os
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = os.path.join(REPO, "benchmarks", "gpu_suite.py")

CEILINGS = ("copy_bandwidth_gbs", "matmul_tflops", "seconds")
SAMPLER_BATCH = (
    "tokens_per_s",
    "decode_tokens_per_s",
    "wall_s",
    "prefill_s",
    "decode_s",
    "compile_s",
    "weight_bytes",
    "kv_bytes_per_step",
    "decode_fraction_of_roofline",
    "transformers_tokens_per_s",
    "ratio_vs_transformers",
)
UPDATE_RUN = (
    "step_s",
    "compile_s",
    "tokens_per_s",
    "model_tflops_per_step",
    "hlo_tflops_per_step",
    "achieved_tflops",
    "fraction_of_measured_peak",
)
TRAINER = (
    "init_s",
    "first_step_s",
    "first_rollout_s",
    "first_update_s",
    "first_rollout_compile_s",
    "steady_step_s",
    "steady_rollout_s",
    "steady_update_s",
    "steady_rollout_tokens_per_s",
    "steady_update_tokens_per_s",
    "rows_per_step",
)


def _positive(where: str, record: dict, keys) -> None:
    for k in keys:
        v = record.get(k)
        assert isinstance(v, (int, float)) and math.isfinite(v) and v > 0, f"{where}.{k} = {v!r}"


def _ok_or_reason(where: str, record: dict) -> bool:
    """True when `record` is ok; otherwise it must say why."""
    if record["status"] == "ok":
        return True
    assert isinstance(record.get("skip_reason"), str) and record["skip_reason"], f"{where}: {record}"
    return False


# The smoke run switches both attention kernels from their defaults, so the suite's kernel flags are
# exercised end to end (the default kernels are what every other test runs).
KERNEL_FLAGS = ("--attention-impl=xla", "--decode-attention-impl=ragged")


@pytest.fixture(scope="module")
def smoke():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, SUITE, "--smoke", *KERNEL_FLAGS],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(proc.stdout.strip().splitlines()[-1]), wall


def test_smoke_reports_every_stage(smoke):
    stdout, result, wall = smoke
    assert result["smoke"] is True
    machine = result["machine"]
    assert machine["device_kind"] and machine["jax_version"] and machine["backend"] == "cpu"
    assert machine["datasheet_bf16_tflops"] is None  # a CPU has no datasheet bf16 peak in the table
    assert machine["kernels"] == {"attention_impl": "xla", "decode_attention_impl": "ragged"}
    stages = result["stages"]
    assert sorted(stages) == ["ceilings", "sampler", "trainer", "update"]
    # Nothing is over a limit in the smoke run (generous limits): every stage measured everything.
    for name, stage in stages.items():
        assert stage["status"] == "ok", (name, stage.get("skip_reason"))

    _positive("ceilings", stages["ceilings"], CEILINGS)

    sampler = stages["sampler"]
    assert sampler["batches"], sampler
    assert _ok_or_reason("sampler.transformers", sampler["transformers"])
    for b, row in sampler["batches"].items():
        assert _ok_or_reason(f"sampler.batches[{b}]", row)
        _positive(f"sampler.batches[{b}]", row, SAMPLER_BATCH)
        assert row["decode_fraction_of_roofline"] < 10, row  # bytes / s over the copy bandwidth: sane

    runs = stages["update"]["runs"]
    assert sorted(r["mode"] for r in runs.values()) == ["full", "lora"], runs
    for name, run in runs.items():
        assert _ok_or_reason(f"update.runs[{name}]", run)
        _positive(f"update.runs[{name}]", run, UPDATE_RUN)
        assert "fraction_of_datasheet_peak" not in run  # no datasheet peak on a CPU

    trainer = stages["trainer"]
    _positive("trainer", trainer, TRAINER)
    assert trainer["tokenizer"] == "synthetic"
    assert trainer["steady_rollout_compile_s"] == 0, trainer  # the second step reuses the first one's programs
    assert trainer["first_prompts_too_long"] == 0 and trainer["steady_prompts_too_long"] == 0, trainer
    assert trainer["steady_loss"] and all(math.isfinite(x) for x in trainer["steady_loss"]), trainer

    # The table names every stage; the JSON is the last line.
    for name in ("ceilings", "sampler", "update", "trainer"):
        assert any(line.startswith(name) for line in stdout.splitlines()), name


def _suite_module():
    spec = importlib.util.spec_from_file_location("gpu_suite_under_test", SUITE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_stage_over_its_limit_is_skipped_with_the_reason():
    suite = _suite_module()

    def slow(out):
        out["batches"] = {"1": {"status": "ok", "tokens_per_s": 1.0}}
        time.sleep(5)

    def fails(out):
        raise MemoryError("out of device memory")

    t0 = time.perf_counter()
    res = suite.run_stage("sampler", slow, 0.2)
    assert time.perf_counter() - t0 < 3
    assert res["status"] == "partial" and "over its 0.2 s limit" in res["skip_reason"], res
    assert res["batches"]["1"]["status"] == "ok"  # what it had measured is kept
    res = suite.run_stage("update", fails, 10.0)
    assert res["status"] == "skipped" and "MemoryError: out of device memory" in res["skip_reason"], res
    assert "skipped" in suite.table({"stages": {"update": res}})


def test_datasheet_peaks():
    suite = _suite_module()
    assert suite.datasheet_peak("NVIDIA H200") == 989.0
    assert suite.datasheet_peak("NVIDIA H100 80GB HBM3") == 989.0
    assert suite.datasheet_peak("NVIDIA H100 PCIe") == 756.0
    assert suite.datasheet_peak("cpu") is None
