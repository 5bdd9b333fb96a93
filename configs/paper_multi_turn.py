"""The official multi-turn ReMA setup (paper §3.2.2, Fig. 5; ziyuwan/ReMA-public example_7b.sh).

One shared model plays both roles (``adapter.kind='shared'``, both roles' sequences in one
batch), multi-turn MAMRP with the code's prompts: up to 30 turns of 512 tokens, a 4096-token
conversation limit, ``stop_when_truncated``, 16 trajectories per question, 128 questions per step.
Reward: 1 iff the trajectory ends through ``[FINISH]`` with a correct answer (both roles). GRPO
advantages per (role, question), turn-level geometric ratio (the code's choice; set
``loss.ratio_mode='turn_arithmetic'`` for the paper's Eq. 13), trajectory-mean aggregation, no
KL, AdamW lr 1e-6, wd 0.01, 4 mini-batches per step (the paper's text), 500 steps on
MATH levels 3–5 (8,523 problems; the 2 with an empty gold answer are skipped with a warning),
greedy validation every 10 steps.

The paper starts from Qwen2.5-7B after SFT on the ReMA multi-turn conversations; point
``--config.model.source`` at that checkpoint. Needs accelerators: see docs/tpu_pod.md.
"""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = dict(
        source="Qwen/Qwen2.5-7B-Instruct",
        dtype="bfloat16",
        param_dtype="bfloat16",
        random_init=None,
        init_adapters_from=placeholder(str),
        max_cache_len=8192 + 512,
    )
    c.adapter = dict(kind="shared")
    c.rollout = dict(
        mode="multi_turn",
        prompt_variant="code",
        num_samples=16,
        max_turns=30,
        max_new_tokens=512,
        max_prompt_len=4096,
        stop_when_truncated=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
    )
    c.reward = dict(kind="multi_turn")
    c.grading = dict(timeout_s=10.0, workers=8)
    c.advantage = dict(estimator="grpo")
    c.loss = dict(
        ratio_mode="turn_geometric",
        agg_mode="trajectory_mean",
        clip_eps=0.2,
        dual_clip_c=3.0,
        log_ratio_clip=3.0,
        kl_coef=0.0,
        entropy_coef=0.0,
        temperature=1.0,
        max_turns=30,
    )
    c.optimizer = dict(learning_rate=1e-6, schedule="constant", weight_decay=0.01, max_grad_norm=1.0)
    c.update = dict(
        num_mini_batches=4, num_micro_batches=16, share_prefix=True, old_logprobs="auto"
    )  # 4 steps: a π_old pass
    c.schedule = dict(kind="simultaneous")
    c.curriculum = dict(enabled=False)
    c.data = dict(
        source="benchmark",
        benchmark="rema_parquet",
        train_path="../shared/data/rema_public/train_lv3to5_8k.parquet",
        test_path="../shared/data/rema_public/test500.parquet",
        skip_bad_records=True,
    )
    c.loop = dict(
        steps=500,
        questions_per_step=128,
        solutions_per_plan=1,
        seed=0,
        max_seq_len=4096 + 512 + 1,
        eval_every=10,
        eval_questions=500,
        eval_before=True,
    )
    c.mesh = dict(data=-1, fsdp=8, tensor=1)
    c.memory = dict(check=True, device_bytes=None, headroom=0.9)
    c.checkpoint = dict(every=50, keep_last=3)
    return c
