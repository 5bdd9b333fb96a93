"""Default evaluation config: SmolLM2-135M-Instruct, greedy pass@1, VRP vs ReMA single-turn.

Override on the command line, e.g.
  python launch/eval.py --config=configs/eval_default.py --workdir=/tmp/eval \
    --config.benchmarks=math500,gsm8k --config.limit=20 --config.modes=vrp,rema_single_turn
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Model: a local HF dir, a .gguf file, "smollm2-135m" (embedded GGUF) or a hub id.
    c.model = "smollm2-135m"
    c.dtype = "float32"
    # Trained agents per role: an adapter dir (models.save_adapter) or a full-model checkpoint
    # (HF dir / .gguf); "" = the base model for that role.
    c.checkpoints = ml_collections.ConfigDict({"meta_thinking": "", "reasoning": "", "single": ""})
    c.tag = ""  # appended to the column titles, e.g. "step 500"
    # Modes (columns): vrp, mrp, rema_single_turn, rema_multi_turn.
    c.modes = "vrp,rema_single_turn"
    c.prompt_variant = ""  # "" = each mode's default ("paper" single-turn, "code" multi-turn)
    # Benchmarks (rows): registry names, optionally name=path; bare names resolve under data_dir.
    # math500, gsm8k, aime24, amc23, gaokao2023en, minerva_math, olympiadbench, judgebench,
    # rewardbench=<pair file>, builtin.
    c.benchmarks = "math500,gsm8k"
    c.data_dir = "../shared/data"
    c.limit = 0  # first N tasks per benchmark; 0 = all
    c.skip_bad_records = False
    c.builtin = ml_collections.ConfigDict(
        {
            "num_per_level": 8,
            "seed": 0,
            "levels": "1,2,3,4,5",
            "families": "arithmetic,word_problem,linear_equation,polynomial",
        }
    )
    # Decoding: the paper's Table 1 is greedy pass@1.
    c.greedy = True
    c.temperature = 1.0
    c.num_samples = 1
    c.ks = "1"  # pass@k / maj@k for k <= num_samples
    c.max_new_tokens = 512
    c.max_turns = 30
    c.max_prompt_len = 2048
    # A turn that hits max_new_tokens ends the trajectory. None = mode default: True for
    # multi-turn (official rollout), False for single-turn (the RA answers a cut plan).
    c.stop_when_truncated = ml_collections.config_dict.placeholder(bool)
    c.max_cache_len = 4096
    c.batch_size = 16
    c.seed = 0
    # Grading / judging.
    c.grade_timeout = 10.0
    c.judge_both_orders = False
    c.progress = True
    return c
