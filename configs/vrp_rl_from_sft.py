"""The single-agent VRP_RL baseline started from VRP SFT adapters (configs/sft_vrp.py): the same
budget, learning rate and turn length as configs/rema_from_sft.py, so the two compare.

    python launch/train.py --config=configs/vrp_rl_from_sft.py --workdir=runs/vrp_rl_from_sft \
        --config.model.init_adapters_from=runs/sft_vrp/adapters
"""

import ml_collections

from configs import rema_from_sft, vrp_rl_default  # noqa: F401


def get_config() -> ml_collections.ConfigDict:
    c = rema_from_sft.get_config()
    vrp = vrp_rl_default.get_config()
    c.rollout = vrp.rollout
    c.rollout.max_new_tokens = 96
    c.rollout.max_prompt_len = 255
    c.loop.solutions_per_plan = vrp.loop.solutions_per_plan
    c.schedule = vrp.schedule
    return c
