"""Single-agent RL baseline (VRP_RL) on the embedded default: the same budget as configs/rl_from_base.py.

One agent writes chain-of-thought solutions (the paper's VRP prompt); trained with the same reward
(+1 / −0.5 / −1), GRPO and optimizer settings as the default ReMA run, so the two compare.
"""

import ml_collections

from configs import rl_from_base  # noqa: F401  (resolved by launch/train.py's sys.path)


def get_config() -> ml_collections.ConfigDict:
    c = rl_from_base.get_config()
    c.rollout = dict(
        mode="vrp",
        prompt_variant="paper",
        num_samples=4,
        max_new_tokens=64,
        max_prompt_len=191,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        stop_when_truncated=False,
    )
    c.loop.solutions_per_plan = 1
    c.schedule = dict(kind="alternating")
    return c
