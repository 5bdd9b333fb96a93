"""Multi-stage experiment jobs built on SFT and the trainer: ``powered/`` (ReMA vs VRP_RL over seeds
with bootstrap CIs), and what they share with ``rema_jax.training.bootstrap``: ``records.py`` (stage
records: atomic JSON writes, ``StageError``, RL diagnostics) and ``heldout.py`` (reading held-out evals)."""
