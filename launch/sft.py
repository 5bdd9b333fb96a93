"""Supervised warm-start (SFT) of the ReMA agents before RL.

    python launch/sft.py --config=configs/sft_default.py --workdir=runs/sft

Writes ``adapters/<agent>/`` (load with ``rema_jax.models.load_adapter``; the RL trainer starts
from them), ``checkpoints/`` (the RL checkpoint layout), ``metrics.jsonl``, ``loss.png``,
``eval_{before,after}.jsonl`` and ``summary.json`` under ``--workdir``.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags
from ml_collections import config_flags

from rema_jax.cli import run_main

config_flags.DEFINE_config_file("config", None, "SFT config file (configs/sft_*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Output directory: adapters/, checkpoints/, metrics.jsonl, loss.png.")
flags.mark_flags_as_required(["config", "workdir"])

FLAGS = flags.FLAGS


def main(argv):
    del argv
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
    from rema_jax.config_utils import ConfigError
    from rema_jax.sft.train import load_sft_config, run_sft

    try:
        config = load_sft_config(FLAGS.config)
    except ConfigError as e:
        raise ConfigError(f"invalid config {FLAGS['config'].config_filename!r}: {e}") from None
    run = run_sft(config, FLAGS.workdir)
    s = run.summary
    keys = ("steps", "wall_s", "eval_before", "eval_after", "adapters", "plot")
    print(
        json.dumps(
            {k: s[k] for k in keys if k in s} | {k: v for k, v in s.items() if k.endswith(("loss_first", "loss_last"))},
            indent=2,
        )
    )


if __name__ == "__main__":
    run_main(main)
