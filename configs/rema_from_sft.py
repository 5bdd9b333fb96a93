"""Single-turn ReMA RL started from SFT adapters (launch/sft.py --config=configs/sft_default.py).

What the CPU experiment (launch/experiment.py) trains. It differs from configs/rl_from_base.py in three
measured ways:
  * model.init_adapters_from: the SFT adapters (required: ``<dir>/meta_thinking``, ``<dir>/reasoning``);
  * learning rate 2e-5: from the SFT model, 2e-4 lowered held-out accuracy (50.0 → 37.5 → 29.2 %
    on 24 questions) while 2e-5 kept or raised it (50.0 → 54.2 → 54.2 %);
  * 96-token turns (prompt bucket 256, sequences of 352): the worked solutions average 55 tokens and
    some run past 64, which truncated about one answer in eight at 64.

    python launch/train.py --config=configs/rema_from_sft.py --workdir=runs/rema_from_sft \
        --config.model.init_adapters_from=runs/sft/adapters
"""

import ml_collections

from configs import rl_from_base  # noqa: F401  (resolved by launch/*.py's sys.path)


def get_config() -> ml_collections.ConfigDict:
    c = rl_from_base.get_config()
    c.model.max_cache_len = 384
    c.rollout.max_new_tokens = 96
    c.rollout.max_prompt_len = 255
    c.loop.max_seq_len = 352
    c.optimizer.learning_rate = 2e-5
    return c
