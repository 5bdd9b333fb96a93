"""ReMA RL from the base model (no SFT warm start): SmolLM2-135M-Instruct, LoRA agents,
single-turn ReMA on the built-in tasks. Not the default: SmolLM2-135M never writes ``\\boxed{}``
unprompted, so from the base model nearly every reward is the format penalty and most groups have
zero reward variance (the README's main command, ``configs/default.py``, warm-starts with SFT first).

Sized for a 2-core CPU (about 7 minutes): 8 steps of 4 questions × 2 plans × 2 solutions,
alternating between the reasoning agent (RA) and the meta-thinking agent (MTA) every 2 steps
(Algorithm 1), with the paper's shaped rewards and GRPO advantages.

    python launch/train.py --config=configs/rl_from_base.py --workdir=runs/rl_from_base
"""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = dict(
        source="smollm2-135m",
        dtype="float32",
        random_init=None,
        init_adapters_from=placeholder(str),
        max_cache_len=320,
        remat=True,
        scan_layers=True,  # the training passes scan the layers: compiled once (--config.model.scan_layers=false)
    )
    c.adapter = dict(
        kind="lora",
        rank=16,
        alpha=32.0,
        targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    )
    c.rollout = dict(
        mode="single_turn",
        prompt_variant="paper",
        num_samples=2,
        max_new_tokens=64,
        max_prompt_len=191,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        stop_when_truncated=False,
    )
    c.reward = dict(kind="paper")
    c.grading = dict(timeout_s=10.0, workers=1)
    c.advantage = dict(estimator="grpo")
    c.loss = dict(
        ratio_mode="turn_geometric",
        agg_mode="trajectory_mean",
        clip_eps=0.2,
        dual_clip_c=3.0,
        kl_coef=0.0,
        entropy_coef=0.0,
        temperature=1.0,
        max_turns=1,
    )
    c.optimizer = dict(learning_rate=2e-4, schedule="constant", weight_decay=0.0, max_grad_norm=1.0)
    # one optimizer step per rollout batch, so the update takes π_old from its own forward (no log-prob pass)
    c.update = dict(num_mini_batches=1, num_micro_batches=2, share_prefix=True, old_logprobs="auto")
    c.schedule = dict(kind="alternating", reasoning_steps=2, meta_thinking_steps=2)
    c.curriculum = dict(enabled=False)
    c.data = dict(
        source="builtin",
        families=("arithmetic", "word_problem", "linear_equation", "polynomial"),
        levels=(1, 2),
        train_per_cell=32,
        test_per_cell=4,
        split_seed=0,
    )
    c.loop = dict(
        steps=8,
        questions_per_step=4,
        solutions_per_plan=2,
        seed=0,
        max_seq_len=256,
        eval_every=0,
        eval_questions=16,
        eval_before=True,
    )
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    c.memory = dict(check=True, device_bytes=None, headroom=0.9)
    c.checkpoint = dict(every=1, keep_last=2)
    return c
