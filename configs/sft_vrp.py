"""SFT warm-start of the single-agent VRP_RL baseline: the same worked solutions as
configs/sft_default.py's reasoning agent, under the VRP prompt (question → solution ending in
\\boxed{}), so VRP_RL and ReMA start RL from equally fine-tuned models.

    python launch/sft.py --config=configs/sft_vrp.py --workdir=runs/sft_vrp
"""

import ml_collections

from configs import sft_default  # noqa: F401  (resolved by launch/*.py's sys.path)


def get_config() -> ml_collections.ConfigDict:
    c = sft_default.get_config()
    c.data.mode = "vrp"
    c.loop.roles = ("single",)
    return c
