"""The paper's single-turn ReMA setup (Table 1, App. D.1): REINFORCE++ with two separate models.

Hyper-parameters from the paper: two full copies of the model (``adapter.kind='full'``), alternating
updates (Algorithm 1) with the [0.2, 0.8] success-rate curriculum, REINFORCE++ with a k1 KL of 1e-2
folded into the reward, PPO clip 0.2 on token ratios, Adam lr 5e-7, rollout batch 1000 prompts × 4
samples with mini-batches of 500 (8 optimizer steps per rollout), max generation 2048, T = 1.0,
(here 1024 prompts and mini-batches of 512 rows, so a micro-batch of 32 rows divides any
data × fsdp size up to 32), MATH train (7.5k: all seven subject files). The paper's "#Training
Episode = 4" per phase is approximated by ``schedule.*_steps`` (one step = one rollout batch).

Pick the model with ``--config.model.source``: a local HF directory (or a hub id where the network
allows) of Qwen2.5-7B-Instruct (the default below), Llama-3.1-8B-Instruct or Llama-3-8B-Instruct.
Needs accelerators: see docs/tpu_pod.md.
"""

import ml_collections
from ml_collections.config_dict import placeholder

# Hendrycks MATH train: 7,500 problems in seven subject files (listed, not globbed, so a missing
# file is an error rather than a smaller data set). Two number-theory records have an empty gold
# answer (``$\\boxed{}$`` upstream) and are skipped with a warning: 7,498 problems are trained on.
MATH_TRAIN = tuple(
    f"../shared/data/math_train/{subject}.jsonl"
    for subject in (
        "algebra",
        "counting_and_probability",
        "geometry",
        "intermediate_algebra",
        "number_theory",
        "prealgebra",
        "precalculus",
    )
)


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = dict(
        source="Qwen/Qwen2.5-7B-Instruct",
        dtype="bfloat16",
        param_dtype="bfloat16",
        random_init=None,
        init_adapters_from=placeholder(str),
        max_cache_len=4096 + 2048,
    )
    c.adapter = dict(kind="full")
    c.rollout = dict(
        mode="single_turn",
        prompt_variant="paper",
        num_samples=4,
        max_new_tokens=2048,
        max_prompt_len=2048,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        stop_when_truncated=False,
    )
    c.reward = dict(kind="paper")
    c.grading = dict(timeout_s=10.0, workers=8)
    c.advantage = dict(estimator="reinforce_pp", kl_coef=1e-2)
    c.loss = dict(
        ratio_mode="token",
        agg_mode="token_mean",
        clip_eps=0.2,
        dual_clip_c=3.0,
        kl_coef=0.0,
        entropy_coef=0.0,
        temperature=1.0,
        max_turns=1,
    )
    c.optimizer = dict(learning_rate=5e-7, schedule="constant", weight_decay=0.0, max_grad_norm=1.0)
    c.update = dict(
        num_mini_batches=8, num_micro_batches=16, share_prefix=True, old_logprobs="auto"
    )  # 8 steps: a π_old pass
    c.schedule = dict(kind="alternating", reasoning_steps=8, meta_thinking_steps=8)
    c.curriculum = dict(enabled=True, low=0.2, high=0.8, num_samples=10, pool_size=2000)
    c.data = dict(
        source="benchmark",
        benchmark="math_train",
        train_path=MATH_TRAIN,
        test_path="../shared/data/math500/test.jsonl",
        skip_bad_records=True,
    )
    c.loop = dict(
        steps=48,
        questions_per_step=1024,
        solutions_per_plan=1,
        seed=0,
        max_seq_len=4097,
        eval_every=8,
        eval_questions=500,
        eval_before=True,
    )
    c.mesh = dict(data=-1, fsdp=8, tensor=1)
    c.memory = dict(check=True, device_bytes=None, headroom=0.9)
    c.checkpoint = dict(every=4, keep_last=3)
    return c
