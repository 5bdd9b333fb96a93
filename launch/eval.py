"""Evaluate a model (and optional trained agents) on math / judge benchmarks.

  python launch/eval.py --config=configs/eval_default.py --workdir=/tmp/rema_eval \
      --config.benchmarks=math500,gsm8k --config.limit=50 --config.modes=vrp,rema_single_turn

Writes <workdir>/samples/<mode>/<benchmark>.jsonl (resumable), summary.json and table.md.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from rema_jax.cli import run_main  # noqa: E402
from rema_jax.eval import runner  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/eval_default.py", "Evaluation config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (resumes from what is there).", required=True)


def main(argv):
    del argv
    summary = runner.run(_CONFIG.value, _WORKDIR.value)
    print(summary["table"])
    logging.info("wrote %s", os.path.join(_WORKDIR.value, "summary.json"))


if __name__ == "__main__":
    run_main(main)
