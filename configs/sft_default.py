"""SFT warm-start default: SmolLM2-135M-Instruct, LoRA for both agents, built-in worked examples.

Sized for a 2-core CPU (a few minutes): 32 worked examples per agent (4 families × levels 1-2 × the
first 4 training questions of each cell, from the same split as configs/default.py, so SFT never sees
RL's held-out questions),
2 epochs of batch 4 → 16 steps per agent, LoRA lr 1e-3 (the official 1e-5 is for full fine-tuning
of a 7B model), then greedy single-turn ReMA on 16 held-out questions before and after.

    python launch/sft.py --config=configs/sft_default.py --workdir=runs/sft
    # official two-role conversation files instead (long: hours on CPU):
    python launch/sft.py --config=configs/sft_default.py --workdir=runs/sft_files \
        --config.data.builtin=False \
        --config.data.meta_thinking_file=../shared/data/rema_public/sft_multi_turn_meta_thinking.jsonl \
        --config.data.reasoning_file=../shared/data/rema_public/sft_multi_turn_reasoning.jsonl
"""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = dict(
        source="smollm2-135m", dtype="float32", random_init=None, max_cache_len=768, remat=True, scan_layers=True
    )
    c.adapter = dict(
        kind="lora",
        rank=16,
        alpha=32.0,
        targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    )
    c.data = dict(
        builtin=True,
        families=("arithmetic", "word_problem", "linear_equation", "polynomial"),
        levels=(1, 2),
        train_per_cell=32,
        test_per_cell=4,
        examples_per_cell=4,
        split_seed=0,
        prompt_variant=placeholder(str),
        meta_thinking_file=placeholder(str),
        reasoning_file=placeholder(str),
        file_system_prompt="file",
        file_limit=placeholder(int),
    )
    c.optimizer = dict(learning_rate=1e-3, warmup_steps=2, end_lr_ratio=0.1, weight_decay=0.0, max_grad_norm=1.0)
    c.loop = dict(epochs=2, batch_size=4, max_seq_len=384, seed=0, roles=("meta_thinking", "reasoning"))
    c.eval = dict(questions=16, before=True, after=True, max_new_tokens=128, max_prompt_len=512)
    return c
