"""Agent schedules and the resumable task iterator."""

import pytest

from rema_jax.config_utils import ConfigError, from_dict
from rema_jax.training.data_iterator import TaskIterator
from rema_jax.training.schedules import ScheduleConfig, phase_at


def test_alternating_is_algorithm_1():
    cfg = ScheduleConfig(kind="alternating", reasoning_steps=2, meta_thinking_steps=3)
    phases = [phase_at(cfg, s) for s in range(10)]
    assert [p.trained for p in phases] == [("reasoning",)] * 2 + [("meta_thinking",)] * 3 + [("reasoning",)] * 2 + [
        ("meta_thinking",)
    ] * 3
    assert [s for s, p in enumerate(phases) if p.starts] == [0, 2, 5, 7]
    assert phases[0].frozen == ("meta_thinking",)
    assert [p.index for p in phases] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]


def test_switch_every_matches_official_code():
    # Official: active = (global_step // freq + idx(start)) % 2, global_step 1-based:
    # MTA trains steps 1-9, RA 10-19, MTA 20-29.
    cfg = ScheduleConfig(kind="switch_every", switch_freq=10, start_agent="meta_thinking")
    roles = [phase_at(cfg, s).trained[0] for s in range(30)]
    assert roles[:9] == ["meta_thinking"] * 9
    assert roles[9:19] == ["reasoning"] * 10
    assert roles[19:29] == ["meta_thinking"] * 10
    assert phase_at(cfg, 9).starts and not phase_at(cfg, 10).starts


def test_simultaneous_trains_both():
    p = phase_at(ScheduleConfig(kind="simultaneous"), 5)
    assert p.trained == ("meta_thinking", "reasoning") and p.frozen == ()


def test_schedule_config_validation():
    with pytest.raises(ConfigError, match="reasoning_steps must be >= 1"):
        from_dict(ScheduleConfig, {"reasoning_steps": 0})
    with pytest.raises(ConfigError, match="expected one of"):
        from_dict(ScheduleConfig, {"kind": "round_robin"})


def test_task_iterator_is_deterministic_and_resumable():
    tasks = list(range(7))
    it = TaskIterator(tasks, 3, seed=1)
    straight = [it.next() for _ in range(5)]
    assert sorted(sum(straight[:2], []) + straight[2][:1]) == tasks  # first epoch covers every task once
    it2 = TaskIterator(tasks, 3, seed=1)
    first = [it2.next() for _ in range(2)]
    resumed = TaskIterator(tasks, 3, seed=1, position=it2.position)
    assert first + [resumed.next() for _ in range(3)] == straight
    assert TaskIterator(tasks, 7, seed=2).next() != TaskIterator(tasks, 7, seed=1).next()
    assert it.epoch == 2
