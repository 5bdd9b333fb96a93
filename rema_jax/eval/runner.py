"""Builds an evaluation from an `ml_collections` config: benchmarks, model, solvers, and runs it.

Used by ``launch/eval.py``; see ``configs/eval_default.py`` for every field.
"""

from __future__ import annotations

import logging
import pathlib
import time
from typing import Any, Mapping

from rema_jax.eval import harness
from rema_jax.eval import solvers as solvers_lib
from rema_jax.tasks import builtin, loaders
from rema_jax.tasks.types import Task

log = logging.getLogger(__name__)

# Registry names -> the row titles of the paper's Table 1.
BENCHMARK_TITLES = {
    "math500": "MATH500",
    "gsm8k": "GSM8K",
    "aime24": "AIME24",
    "aime25": "AIME25",
    "amc23": "AMC23",
    "gaokao2023en": "Gaokao2023en",
    "minerva_math": "Minerva Math",
    "olympiadbench": "Olympiad Bench",
    "judgebench": "JudgeBench",
    "rewardbench": "RewardBench",
    "builtin": "Builtin",
}

# Where each benchmark lives under the shared data folder (README of ../shared/data).
SHARED_PATHS = {
    "math500": "math500/test.jsonl",
    "gsm8k": "gsm8k/test.jsonl",
    "aime24": "aime24/test.jsonl",
    "amc23": "amc23/test.jsonl",
    "gaokao2023en": "gaokao2023en/test.jsonl",
    "minerva_math": "minerva_math/test.jsonl",
    "olympiadbench": "olympiadbench/test.jsonl",
    "judgebench": "judgebench/gpt.jsonl",
}


def _split_list(spec: str) -> list[str]:
    return [s.strip() for s in str(spec).split(",") if s.strip()]


def parse_benchmark_spec(spec: str, data_dir: str = "") -> list[tuple[str, str | None]]:
    """``"math500,gsm8k=/x/test.jsonl,builtin"`` -> [(name, path or None for builtin)].

    A name without ``=path`` resolves to its shared-data file under `data_dir`.
    """
    out = []
    for item in _split_list(spec):
        name, _, path = item.partition("=")
        name = name.strip()
        if name == "builtin":
            out.append((name, None))
            continue
        if name not in loaders.BENCHMARKS:
            raise ValueError(f"benchmark {name!r}: unknown; registered: {sorted(loaders.BENCHMARKS)} or 'builtin'")
        if not path:
            if name not in SHARED_PATHS or not data_dir:
                raise ValueError(f"benchmark {name!r}: give a path as {name}=/path/to/file (or set data_dir)")
            path = str(pathlib.Path(data_dir) / SHARED_PATHS[name])
        out.append((name, path.strip()))
    if not out:
        raise ValueError("no benchmarks given")
    return out


def load_eval_tasks(config) -> dict[str, list[Task]]:
    """``{row title: tasks}`` from ``config.benchmarks`` (plus ``config.builtin`` for 'builtin')."""
    limit = int(config.limit) or None
    benches: dict[str, list[Task]] = {}
    for name, path in parse_benchmark_spec(config.benchmarks, config.data_dir):
        title = BENCHMARK_TITLES.get(name, name)
        if path is None:
            b = config.builtin
            _, test = builtin.builtin_split(
                0,
                int(b.num_per_level),
                seed=int(b.seed),
                families=tuple(_split_list(b.families)),
                levels=tuple(int(x) for x in _split_list(b.levels)),
            )
            tasks = test[:limit] if limit else test
        else:
            loaded = loaders.load_benchmark(name, path, skip_bad_records=bool(config.skip_bad_records), limit=limit)
            if loaded.stats.skipped:
                log.warning("%s: %d bad records skipped (see the warning above)", title, loaded.stats.skipped)
            tasks = loaded.tasks
        if title in benches:
            raise ValueError(f"benchmark {title!r} given twice")
        benches[title] = tasks
    return benches


def settings_from_config(config) -> harness.EvalSettings:
    return harness.EvalSettings(
        batch_size=int(config.batch_size),
        num_samples=int(config.num_samples),
        ks=tuple(int(k) for k in _split_list(config.ks)),
        judge_both_orders=bool(config.judge_both_orders),
        grade_timeout=float(config.grade_timeout),
        progress=bool(config.progress),
    )


def load_agent_adapters(sources: Mapping[str, str], dtype: str) -> dict[str, Any]:
    """Trained agents per role: an adapter dir (``save_adapter`` output, LoRA or full) or a
    full-model checkpoint (HF dir / .gguf, used as a ``full`` adapter). Empty sources are skipped."""
    from rema_jax.models import Adapter, load, load_adapter  # pylint: disable=g-import-not-at-top

    out = {}
    for role, src in sources.items():
        if not src:
            continue
        if (pathlib.Path(src) / "adapter_config.json").is_file():
            out[role] = load_adapter(src)
        else:
            out[role] = Adapter(weights=load(src, dtype=dtype, with_tokenizer=False).params, kind="full")
    return out


def build_solvers(config) -> dict[str, harness.SolveFn]:
    """``{column title: solve_fn}`` for every mode in ``config.modes``, on the real model + sampler."""
    from rema_jax.models.hub import load  # pylint: disable=g-import-not-at-top
    from rema_jax.rollout import ChatEncoder, make_sampler_policy  # pylint: disable=g-import-not-at-top
    from rema_jax.sampling import Sampler  # pylint: disable=g-import-not-at-top

    modes = _split_list(config.modes)
    for m in modes:
        if m not in solvers_lib.MODES:
            raise ValueError(f"unknown mode {m!r}; expected some of {sorted(solvers_lib.MODES)}")
    t0 = time.time()
    model = load(config.model, dtype=config.dtype)
    log.info("loaded %s in %.1fs", config.model, time.time() - t0)
    # Roles without a checkpoint run the base model (adapter None).
    agents = load_agent_adapters(
        {
            "meta_thinking": config.checkpoints.meta_thinking,
            "reasoning": config.checkpoints.reasoning,
            "single": config.checkpoints.single,
        },
        config.dtype,
    )
    sampler = Sampler(model.config, model.tokenizer, max_cache_len=int(config.max_cache_len))
    encoder = ChatEncoder(model.tokenizer)
    out = {}
    for m in modes:
        math_cfg, judge_cfg = solvers_lib.rollout_configs(
            m,
            greedy=bool(config.greedy),
            temperature=float(config.temperature),
            max_new_tokens=int(config.max_new_tokens),
            max_turns=int(config.max_turns),
            max_prompt_len=int(config.max_prompt_len),
            prompt_variant=config.prompt_variant or None,
            stop_when_truncated=config.stop_when_truncated,
        )
        policy = make_sampler_policy(sampler, model.params, solvers_lib.adapters_for(m, agents), seed=int(config.seed))
        title = solvers_lib.MODE_TITLES[m] + (f" [{config.tag}]" if config.tag else "")
        out[title] = solvers_lib.rollout_solver(policy, encoder, math_cfg, judge_cfg)
    return out


def run(config, workdir: str | pathlib.Path, solvers: Mapping[str, harness.SolveFn] | None = None) -> dict:
    """Loads the benchmarks, builds the solvers (unless given) and runs `harness.run_evaluation`."""
    benches = load_eval_tasks(config)
    solvers = dict(solvers) if solvers is not None else build_solvers(config)
    summary = harness.run_evaluation(benches, solvers, workdir, settings=settings_from_config(config))
    log.info("eval done in %.1fs", summary["wall_seconds"])
    return summary
