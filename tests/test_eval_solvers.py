"""Rollout-backed solvers and the config runner, with a scripted policy and a tiny chat tokenizer."""

import functools
import json
import re

import pytest

from rema_jax.eval import harness, runner, solvers
from rema_jax.rollout import ChatEncoder
from rema_jax.rollout import prompts as P
from rema_jax.sampling import Generation
from rema_jax.tasks.types import Task, judge_task

CHATML = (
    "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + "
    "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@functools.lru_cache(maxsize=1)
def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(
        [P.PAPER_VRP_SYSTEM, P.PAPER_MAMRP_HIGH_SYSTEM, "What is 2 + 2? \\boxed{4} [[A]]"] * 4, trainer
    )
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf.chat_template = CHATML
    return hf


class ArithmeticPolicy:
    """Reads 'What is a + b?' from the prompt; the single agent / RA answers a+b boxed, but answers
    wrong (a+b+1) when `wrong_single` is set; the MTA writes a plan; judge RAs say [[A]]."""

    def __init__(self, tok, wrong_single=False):
        self.tok, self.wrong_single, self.calls = tok, wrong_single, []

    def __call__(self, role, prompts, sampling):
        self.calls.append((role, len(prompts), sampling))
        out = []
        for ids in prompts:
            text = self.tok.decode(ids)
            if role == P.META_THINKING:
                reply = "Plan: add the two numbers."
            elif "[The Start of Assistant A" in text or "answer_a" in text or "Assistant A" in text:
                reply = "Verdict: [[A]]"
            else:
                a, b = map(int, re.findall(r"What is (\d+) \+ (\d+)\?", text)[-1])
                s = a + b + (1 if (self.wrong_single and role == P.SINGLE) else 0)
                reply = f"The sum is \\boxed{{{s}}}."
            gen = self.tok(reply, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
            out.append(Generation(gen, [-0.1] * len(gen), "stop", reply))
        return out


def _tasks():
    return [Task(uid=f"t{a}", question=f"What is {a} + {a + 1}?", answer=str(2 * a + 1)) for a in range(1, 6)]


def exact_grade(preds, golds):
    class G:  # minimal GradeResult
        def __init__(self, ok, ex):
            self.correct, self.extracted, self.timed_out, self.error = ok, ex, False, None

    out = []
    for p, g in zip(preds, golds):
        m = re.findall(r"\\boxed\{([^}]*)\}", p)
        out.append(G(bool(m) and m[-1] == g, m[-1] if m else None))
    return out


@pytest.mark.parametrize(
    "mode,roles",
    [
        ("vrp", ["single"]),
        ("mrp", ["single"]),
        ("rema_single_turn", ["meta_thinking", "reasoning"]),
        ("rema_multi_turn", ["meta_thinking", "reasoning"]),
    ],
)
def test_rollout_solver_modes(mode, roles):
    tok = _tokenizer()
    policy = ArithmeticPolicy(tok)
    math_cfg, judge_cfg = solvers.rollout_configs(mode, max_new_tokens=32, max_turns=2, max_prompt_len=1024)
    assert math_cfg.greedy and math_cfg.num_samples == 1
    solve = solvers.rollout_solver(policy, ChatEncoder(tok), math_cfg, judge_cfg)
    tasks = _tasks()
    outs = solve(tasks)
    assert len(outs) == 5
    assert [o["final_answer"] for o in outs] == [f"The sum is \\boxed{{{t.answer}}}." for t in tasks]
    assert [m["role"] for m in outs[0]["messages"]][: len(roles)] == roles
    assert {c[0] for c in policy.calls} == set(roles)
    assert all(c[1] == 5 for c in policy.calls)  # one batched call per role per round
    assert all(c[2].greedy for c in policy.calls)


def test_judge_solver_single_turn_only():
    tok = _tokenizer()
    pair = judge_task("p", "Which is right?", "four", "five", "A>B")
    math_cfg, judge_cfg = solvers.rollout_configs("rema_single_turn", max_new_tokens=32)
    outs = solvers.rollout_solver(ArithmeticPolicy(tok), ChatEncoder(tok), math_cfg, judge_cfg)([pair])
    assert outs[0]["final_answer"] == "Verdict: [[A]]"
    _, none = solvers.rollout_configs("vrp")
    solve = solvers.rollout_solver(ArithmeticPolicy(tok), ChatEncoder(tok), *solvers.rollout_configs("vrp"))
    assert none is None
    with pytest.raises(ValueError, match="judge tasks need a judge_config"):
        solve([pair])
    with pytest.raises(ValueError, match="one task kind per batch"):
        solvers.rollout_solver(ArithmeticPolicy(tok), ChatEncoder(tok), math_cfg, judge_cfg)([pair, _tasks()[0]])


def test_adapters_for_and_unknown_mode():
    assert solvers.adapters_for("vrp", {}) == {"single": None}
    assert solvers.adapters_for("rema_single_turn", {"reasoning": "ra"}) == {"meta_thinking": None, "reasoning": "ra"}
    with pytest.raises(ValueError, match="unknown eval mode"):
        solvers.rollout_configs("cot")
    with pytest.raises(ValueError, match="unknown agent roles"):
        solvers.adapters_for("vrp", {"planner": 1})


def _config(tmp_path, **over):
    import importlib.util

    import ml_collections

    spec = importlib.util.spec_from_file_location(
        "eval_default", runner.__file__.replace("rema_jax/eval/runner.py", "configs/eval_default.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    c.progress = False
    c.data_dir = str(tmp_path)
    for k, v in over.items():
        setattr(c, k, v)
    assert isinstance(c, ml_collections.ConfigDict)
    return c


def test_parse_benchmark_spec(tmp_path):
    spec = runner.parse_benchmark_spec("math500, gsm8k=/x/g.jsonl,builtin", str(tmp_path))
    assert spec == [("math500", str(tmp_path / "math500/test.jsonl")), ("gsm8k", "/x/g.jsonl"), ("builtin", None)]
    with pytest.raises(ValueError, match="unknown"):
        runner.parse_benchmark_spec("mmlu", "")
    with pytest.raises(ValueError, match="give a path"):
        runner.parse_benchmark_spec("rewardbench", str(tmp_path))


def test_runner_end_to_end_with_rollout_solvers(tmp_path, monkeypatch):
    """Config -> benchmarks (a fixture file + builtin) -> two rollout solvers -> table.md."""
    gsm = tmp_path / "gsm8k" / "test.jsonl"
    gsm.parent.mkdir()
    gsm.write_text(
        "".join(
            json.dumps({"question": f"What is {a} + {a}?", "answer": f"...\n#### {2 * a}"}) + "\n" for a in range(1, 4)
        )
    )
    cfg = _config(tmp_path, benchmarks="gsm8k", batch_size=2)
    tok = _tokenizer()
    built = {}
    for mode, wrong in (("vrp", True), ("rema_single_turn", False)):
        m, j = solvers.rollout_configs(mode, max_new_tokens=32)
        built[solvers.MODE_TITLES[mode]] = solvers.rollout_solver(ArithmeticPolicy(tok, wrong), ChatEncoder(tok), m, j)
    monkeypatch.setattr(harness, "default_grade_fn", lambda timeout: exact_grade)
    monkeypatch.setattr(harness, "default_boxed_fn", lambda: lambda s: "x" if "\\boxed" in s else None)
    summary = runner.run(cfg, tmp_path / "out", solvers=built)
    table = (tmp_path / "out" / "table.md").read_text()
    assert table.splitlines()[0] == "| Benchmark | VRP | ReMA (single-turn) |"
    assert "| GSM8K | 0.00 | 100.00 (+100.00) |" in table
    recs = [json.loads(l) for l in open(tmp_path / "out" / "samples" / "ReMA__single-turn_" / "GSM8K.jsonl")]
    assert [m["role"] for m in recs[0]["messages"]] == ["meta_thinking", "reasoning"]
    assert summary["results"]["VRP"]["GSM8K"]["num_tasks"] == 3


def test_load_eval_tasks_builtin_and_limit(tmp_path):
    cfg = _config(tmp_path, benchmarks="builtin", limit=7)
    cfg.builtin.num_per_level = 2
    cfg.builtin.levels = "1,2"
    cfg.builtin.families = "arithmetic,polynomial"
    tasks = runner.load_eval_tasks(cfg)["Builtin"]
    assert len(tasks) == 7 and {t.subject for t in tasks} == {"arithmetic", "polynomial"}


def test_load_eval_tasks_shared(shared_data):
    import ml_collections

    cfg = _config(shared_data, benchmarks="math500,gsm8k,aime24,amc23,minerva_math,olympiadbench,judgebench", limit=0)
    assert isinstance(cfg, ml_collections.ConfigDict)
    benches = runner.load_eval_tasks(cfg)
    assert {k: len(v) for k, v in benches.items()} == {
        "MATH500": 500,
        "GSM8K": 1319,
        "AIME24": 30,
        "AMC23": 40,
        "Minerva Math": 272,
        "Olympiad Bench": 675,
        "JudgeBench": 350,
    }


@pytest.mark.slow
@pytest.mark.real_model
def test_launch_eval_smollm2_smoke(tmp_path, smollm2_gguf):
    """The CLI on the real SmolLM2 + sampler: two builtin level-1 questions, VRP, 32 new tokens."""
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(runner.__file__).resolve().parents[2]
    cmd = [
        sys.executable,
        str(root / "launch/eval.py"),
        f"--config={root}/configs/eval_default.py",
        f"--workdir={tmp_path}",
        "--config.benchmarks=builtin",
        "--config.builtin.num_per_level=2",
        "--config.builtin.levels=1",
        "--config.builtin.families=arithmetic",
        "--config.modes=vrp",
        "--config.max_new_tokens=32",
        "--config.progress=False",
    ]
    subprocess.run(cmd, check=True, cwd=root, timeout=900)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["results"]["VRP"]["Builtin"]["num_tasks"] == 2
    assert (tmp_path / "table.md").read_text().startswith("| Benchmark | VRP |")


def test_load_agent_adapters_from_adapter_dir(tmp_path):
    import jax
    import numpy as np

    from rema_jax.models import AdapterConfig, init_adapter, save_adapter
    from rema_jax.models.testing import random_params, tiny_config

    cfg = tiny_config()
    params = random_params(cfg, jax.random.PRNGKey(0))
    lora = init_adapter(cfg, params, AdapterConfig(kind="lora", rank=2, alpha=4.0), jax.random.PRNGKey(1))
    save_adapter(tmp_path / "ra", lora)
    got = runner.load_agent_adapters({"meta_thinking": "", "reasoning": str(tmp_path / "ra")}, "float32")
    assert set(got) == {"reasoning"} and got["reasoning"].kind == "lora" and got["reasoning"].scale == 2.0
    a, b = jax.tree.leaves(lora.weights), jax.tree.leaves(got["reasoning"].weights)
    assert len(a) == len(b) and all(np.allclose(x, y) for x, y in zip(a, b))


def test_truncated_plan_still_answered_in_single_turn_eval():
    """A meta-thinking plan cut at max_new_tokens: single-turn eval lets the RA answer anyway."""
    tok = _tokenizer()

    class LongPlan(ArithmeticPolicy):
        def __call__(self, role, prompts, sampling):
            gens = super().__call__(role, prompts, sampling)
            if role == P.META_THINKING:
                return [Generation(g.token_ids, g.logprobs, "length", g.text) for g in gens]
            return gens

    task = _tasks()[:1]
    m, j = solvers.rollout_configs("rema_single_turn", max_new_tokens=32)
    assert m.stop_when_truncated is False
    assert solvers.rollout_solver(LongPlan(tok), ChatEncoder(tok), m, j)(task)[0]["final_answer"].endswith("{3}.")
    m, j = solvers.rollout_configs("rema_single_turn", max_new_tokens=32, stop_when_truncated=True)
    assert solvers.rollout_solver(LongPlan(tok), ChatEncoder(tok), m, j)(task)[0]["final_answer"] == ""
    assert solvers.rollout_configs("rema_multi_turn")[0].stop_when_truncated is True
