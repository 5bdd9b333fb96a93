"""Trainer loop, schedules, curriculum, checkpoints, metrics and plots."""
