"""SFT warm-start: worked examples, alpaca parsing, role loss masks, batching, training, saving."""

import json
import os

import jax
import numpy as np
import pytest

from rema_jax import models
from rema_jax.rewards.math_grading import strict_boxed_answer
from rema_jax.rollout import ChatEncoder, prompts
from rema_jax.sft import data as data_lib
from rema_jax.sft import tokenize as tok_lib
from rema_jax.sft.train import load_sft_config, make_sft_step, run_sft
from rema_jax.sft.worked import WorkedExampleError, worked_example
from rema_jax.tasks.builtin import SEED_EXAMPLE, builtin_split
from rema_jax.tasks.loaders import BadRecordError
from rema_jax.tasks.types import Task

TINY = {"num_layers": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "num_kv_heads": 2, "head_dim": 8}


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf):
    from rema_jax.models.tokenizer import load_tokenizer

    return load_tokenizer(os.path.dirname(smollm2_gguf), gguf_file=os.path.basename(smollm2_gguf))


@pytest.fixture(scope="module")
def encoder(tokenizer):
    return ChatEncoder(tokenizer)


# ------------------------------------------------------------------ worked examples
def test_worked_examples_solve_every_builtin_cell():
    train, test = builtin_split(12, 3, seed=3, levels=(1, 2, 3, 4, 5))
    for task in train + test + [SEED_EXAMPLE]:
        ex = worked_example(task)  # raises if the re-solved value differs from the gold answer
        assert strict_boxed_answer(ex.solution) == task.answer
        assert "\\boxed" not in ex.plan and ex.plan.endswith("Do not give the final number.")
    seed = worked_example(SEED_EXAMPLE)
    assert "a = -3" in seed.solution and "b = 2" in seed.solution


def test_worked_example_rejects_unknown_and_mismatching_tasks():
    with pytest.raises(WorkedExampleError, match="built-in tasks"):
        worked_example(Task(uid="x", question="What is 1+1?", answer="2", subject="algebra", source="math"))
    bad = Task(
        uid="builtin/arithmetic/1/x",
        question="What is $2 + 5$?",
        answer="8",
        level=1,
        subject="arithmetic",
        source="builtin",
    )
    with pytest.raises(WorkedExampleError, match="gold answer is 8"):
        worked_example(bad)


def test_builtin_conversations_use_the_rollout_prompts():
    train, _ = builtin_split(1, 0, seed=0, levels=(1,))
    convs = data_lib.builtin_conversations(train)
    ps = prompts.get_prompts("single_turn")
    mta, ra = convs["meta_thinking"][0], convs["reasoning"][0]
    plan = mta.messages[-1][1]
    assert mta.messages[0] == ("system", ps["meta_thinking"].system)
    assert mta.messages[1] == ("user", ps["meta_thinking"].user({"question": train[0].question}))
    assert ra.messages[0] == ("system", ps["reasoning"].system)
    assert ra.messages[1] == ("user", ps["reasoning"].user({"question": train[0].question}, plan))


def test_builtin_vrp_conversations_are_the_same_solutions_for_one_agent():
    train, _ = builtin_split(1, 0, seed=0, levels=(1,))
    remas = data_lib.builtin_conversations(train)["reasoning"]
    vrp = data_lib.builtin_conversations(train, mode="vrp")
    assert list(vrp) == ["single"] and len(vrp["single"]) == len(train)
    ps = prompts.get_prompts("vrp")
    for task, conv, ra in zip(train, vrp["single"], remas):
        assert conv.role == "single"
        assert conv.messages[:2] == (
            ("system", ps["single"].system),
            ("user", ps["single"].user({"question": task.question})),
        )
        assert conv.messages[2] == ra.messages[2]  # the very solution the reasoning agent learns
    with pytest.raises(ValueError, match="mode must be one of"):
        data_lib.builtin_conversations(train, mode="multi_turn")


# ------------------------------------------------------------------ alpaca files
def _record(**over):
    rec = {
        "instruction": "final user",
        "input": None,
        "output": "final answer [FINISH]",
        "system": "SYS",
        "history": [["q1", "a1"], ["q2", "a2"]],
    }
    rec.update(over)
    return rec


def test_alpaca_record_order():
    conv = data_lib.parse_alpaca_record(_record(input="extra"), "reasoning", "f.jsonl:1")
    assert conv.messages == (
        ("system", "SYS"),
        ("user", "q1"),
        ("assistant", "a1"),
        ("user", "q2"),
        ("assistant", "a2"),
        ("user", "final user\nextra"),
        ("assistant", "final answer [FINISH]"),
    )


@pytest.mark.parametrize(
    "over, field",
    [
        ({"history": [["q1"]]}, "history[0]"),
        ({"history": "q1"}, "history"),
        ({"output": ""}, "output"),
        ({"instruction": 3}, "instruction"),
        ({"history": [["q1", "  "]]}, "history[0][1]"),
    ],
)
def test_bad_records_name_file_line_and_field(tmp_path, over, field):
    path = tmp_path / "mta.jsonl"
    path.write_text(json.dumps(_record()) + "\n" + json.dumps(_record(**over)) + "\n", encoding="utf-8")
    with pytest.raises(BadRecordError) as e:
        data_lib.load_alpaca_file(str(path), "meta_thinking")
    assert e.value.where == "mta.jsonl:2" and e.value.field == field
    assert f"mta.jsonl:2: field {field!r}" in str(e.value)


def test_invalid_json_names_the_line(tmp_path):
    path = tmp_path / "ra.jsonl"
    path.write_text(json.dumps(_record()) + "\n{oops\n", encoding="utf-8")
    with pytest.raises(BadRecordError, match="ra.jsonl:2: invalid JSON"):
        data_lib.load_alpaca_file(str(path), "reasoning")


def test_system_prompt_override(tmp_path):
    path = tmp_path / "mta.jsonl"
    path.write_text(json.dumps(_record()) + "\n", encoding="utf-8")
    conv = data_lib.load_alpaca_file(str(path), "meta_thinking", system_prompt="RL SYSTEM")[0]
    assert conv.messages[0] == ("system", "RL SYSTEM") and conv.messages[1] == ("user", "q1")


# ------------------------------------------------------------------ loss masks
def _masked_texts(enc, tokenizer):
    """Decoded runs of consecutive loss-masked tokens."""
    runs, cur = [], []
    for t, m in zip(enc.tokens, enc.loss_mask):
        if m:
            cur.append(int(t))
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tokenizer.decode(r) for r in runs]


def _check_mask(conv, encoder, tokenizer):
    enc = tok_lib.encode_conversation(conv, encoder)
    eos = tokenizer.eos_token
    expected = [text + eos for who, text in conv.messages if who == "assistant"]
    assert _masked_texts(enc, tokenizer) == expected
    # Nothing but the assistant turns: the unmasked text is exactly the rendered prompt parts.
    full = tokenizer.decode(enc.tokens.tolist())
    assert full.endswith(expected[-1])
    assert enc.loss_mask[0] == 0 and enc.tokens.dtype == np.int32


def test_loss_mask_covers_assistant_tokens_alpaca(encoder, tokenizer):
    conv = data_lib.parse_alpaca_record(_record(), "meta_thinking", "f:1")
    _check_mask(conv, encoder, tokenizer)


def test_loss_mask_covers_assistant_tokens_builtin(encoder, tokenizer):
    train, _ = builtin_split(1, 0, seed=0, families=("polynomial",), levels=(4,))
    for conv in data_lib.builtin_conversations(train).values():
        _check_mask(conv[0], encoder, tokenizer)


def test_loss_mask_on_the_official_files(encoder, tokenizer, shared_data):
    for role in ("meta_thinking", "reasoning"):
        path = shared_data / "rema_public" / f"sft_multi_turn_{role}.jsonl"
        convs = data_lib.load_alpaca_file(str(path), role, limit=3)
        for conv in convs:
            _check_mask(conv, encoder, tokenizer)
    assert len(data_lib.load_alpaca_file(str(path), "reasoning")) == 804


def test_left_truncation_is_counted(encoder, tokenizer, caplog):
    conv = data_lib.parse_alpaca_record(_record(history=[["q" * 50, "a" * 300]] * 3), "reasoning", "f:1")
    full = tok_lib.encode_conversation(conv, encoder)
    rows, stats = tok_lib.encode_all([conv, conv], encoder, max_len=len(full.tokens) - 40)
    assert stats["truncated"] == 2 and "cut from the left" in caplog.text
    np.testing.assert_array_equal(rows[0].tokens, full.tokens[40:])
    assert rows[0].loss_mask[0] == 0 and rows[0].loss_mask[1:].sum() == full.loss_mask[41:].sum()


def test_batches_static_deterministic_and_complete(encoder):
    train, _ = builtin_split(3, 0, seed=0, levels=(1, 2))
    rows, _ = tok_lib.encode_all(data_lib.builtin_conversations(train)["reasoning"], encoder, 384)
    a = list(tok_lib.epoch_batches(rows, 5, 384, seed=1, epoch=0, pad_id=2))
    b = list(tok_lib.epoch_batches(rows, 5, 384, seed=1, epoch=0, pad_id=2))
    c = list(tok_lib.epoch_batches(rows, 5, 384, seed=1, epoch=1, pad_id=2))
    assert all(x["tokens"].shape[0] == 5 and x["tokens"].shape[1] in (64, 128, 256, 384) for x in a)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["tokens"], y["tokens"])
    assert any(
        not np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, c) if x["tokens"].shape == y["tokens"].shape
    )
    # every row appears exactly once per epoch; filler rows have no loss
    assert sum(float(x["loss_mask"].sum()) for x in a) == sum(float(r.loss_mask.sum()) for r in rows)
    assert sum(int(x["attention_mask"].any(1).sum()) for x in a) == len(rows)


# ------------------------------------------------------------------ training
def _tiny_config(**sections):
    cfg = {
        "model": {"source": "smollm2-135m", "random_init": TINY, "max_cache_len": 640},
        "adapter": {"kind": "lora", "rank": 4, "alpha": 8.0},
        "data": {"builtin": True, "levels": [1], "train_per_cell": 2, "test_per_cell": 1},
        "optimizer": {"learning_rate": 3e-2, "warmup_steps": 1},
        "loop": {"epochs": 4, "batch_size": 4, "max_seq_len": 256},
        "eval": {"questions": 0},
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    return load_sft_config(cfg)


def test_config_errors_are_specific():
    from rema_jax.config_utils import ConfigError

    with pytest.raises(ConfigError, match="config.loop: unknown key"):
        load_sft_config({"loop": {"epoch": 2}})
    with pytest.raises(ConfigError, match="roles: unknown"):
        load_sft_config({"loop": {"roles": ["judge"]}})
    with pytest.raises(ConfigError, match="no SFT data"):
        load_sft_config({"data": {"builtin": False}})
    with pytest.raises(ConfigError, match="trains the single agent only"):
        load_sft_config({"data": {"mode": "vrp"}})
    with pytest.raises(ConfigError, match="needs data.mode='vrp'"):
        load_sft_config({"loop": {"roles": ["single"]}})
    with pytest.raises(ConfigError, match=r"config.data.mode: expected one of \['single_turn', 'vrp'\]"):
        load_sft_config({"data": {"mode": "multi_turn"}})


def test_sft_loss_decreases_saves_and_reloads(smollm2_gguf, tmp_path):
    run = run_sft(_tiny_config(), str(tmp_path), progress=False)
    s = run.summary
    for role in ("meta_thinking", "reasoning"):
        assert s[f"{role}/loss_last"] < s[f"{role}/loss_first"] - 0.5, s
    records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert len(records) == s["steps"] == sum(s["steps_per_agent"].values())
    assert os.path.exists(tmp_path / "loss.png")
    # adapters load back and give the trained logits
    batch = next(
        tok_lib.epoch_batches(
            tok_lib.encode_all(
                data_lib.builtin_conversations(builtin_split(1, 0, levels=(1,))[0])["reasoning"],
                ChatEncoder(run.tokenizer),
                256,
            )[0],
            2,
            256,
            seed=0,
            epoch=0,
            pad_id=2,
        )
    )
    loaded = models.load_adapter(tmp_path / "adapters" / "reasoning")
    assert loaded.kind == "lora" and loaded.scale == 2.0
    want = models.forward(
        run.model_config, run.base, batch["tokens"], run.adapters["reasoning"], attention_mask=batch["attention_mask"]
    )
    got = models.forward(run.model_config, run.base, batch["tokens"], loaded, attention_mask=batch["attention_mask"])
    base = models.forward(run.model_config, run.base, batch["tokens"], attention_mask=batch["attention_mask"])
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    assert np.abs(np.asarray(got) - np.asarray(base)).max() > 1e-2
    # the orbax checkpoint has the RL trainer's layout
    from rema_jax.training.checkpoint import CheckpointManager

    mgr = CheckpointManager(str(tmp_path / "checkpoints"))
    assert mgr.latest_step() == s["steps"]
    mgr.close()


def test_step_trains_only_the_named_agent_and_matches_a_dense_loss():
    from rema_jax import rl
    from rema_jax.models.adapters import AdapterConfig, init_adapter
    from rema_jax.models.testing import random_params, tiny_config
    from rema_jax.sft.train import masked_nll

    cfg = tiny_config()
    base = random_params(cfg, jax.random.key(0))
    ac = AdapterConfig(rank=2, alpha=4.0)
    params = {
        r: init_adapter(cfg, base, ac, jax.random.key(i)).weights for i, r in enumerate(("meta_thinking", "reasoning"))
    }
    opt = rl.MultiAgentOptimizer(rl.OptimizerConfig(learning_rate=1e-2))
    state = rl.init_rl_state(params, opt)
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 128, (2, 16)).astype(np.int32)
    mask = np.zeros((2, 16), np.float32)
    mask[:, 9:14] = 1
    batch = {"tokens": tokens, "attention_mask": np.ones((2, 16), np.int32), "loss_mask": mask}
    # sparse (K = 8) loss == dense log-softmax loss
    import jax.numpy as jnp

    logits = models.forward(cfg, base, tokens)
    logp = jax.nn.log_softmax(logits[:, :-1], -1)
    dense = -np.take_along_axis(np.asarray(logp), tokens[:, 1:, None], -1)[..., 0]
    want = (dense * mask[:, 1:]).sum() / mask.sum()
    got, count = masked_nll(
        lambda pos: models.forward(cfg, base, tokens, logits_at_bk=pos), jnp.asarray(tokens), None, jnp.asarray(mask), 8
    )
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    assert float(count) == 10
    from rema_jax.training.layout import AgentLayout

    step = make_sft_step(cfg, opt, AgentLayout.for_roles(("meta_thinking", "reasoning"), ac))
    p, o, m = step(state.params, state.opt_state, base, batch, agent="reasoning", k=8)
    assert rl.tree_bitwise_equal(p["meta_thinking"], params["meta_thinking"])
    assert rl.tree_bitwise_equal(o["meta_thinking"], state.opt_state["meta_thinking"])
    assert not rl.tree_bitwise_equal(p["reasoning"], params["reasoning"])
    np.testing.assert_allclose(float(m["loss"]), want, rtol=1e-5)  # LoRA b = 0: base loss
