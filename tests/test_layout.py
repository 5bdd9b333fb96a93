"""AgentLayout: roles → agents, trainable trees and constants, policy / reference / sampling views.

Roles are data: a layout of three roles (a verifier beside the two ReMA agents) needs no new branch.
"""

import jax
import numpy as np
import pytest

from rema_jax import models
from rema_jax.models.adapters import AdapterConfig
from rema_jax.models.testing import random_params, tiny_config
from rema_jax.rl import tree_bitwise_equal
from rema_jax.training.layout import BASE, REFERENCE, SHARED, AgentLayout

ROLES3 = ("meta_thinking", "reasoning", "verifier")


@pytest.fixture(scope="module")
def model():
    cfg = tiny_config()
    return cfg, random_params(cfg, jax.random.key(0))


def _logits(cfg, view, tokens):
    base, adapter = view
    return np.asarray(models.forward(cfg, base, tokens, adapter=adapter))


def test_three_role_lora_layout_gives_each_role_its_own_agent(model):
    cfg, base = model
    adapter = AdapterConfig(kind="lora", rank=2, alpha=4.0)
    layout = AgentLayout.for_roles(ROLES3, adapter)
    assert layout.agents == ROLES3 and not layout.needs_reference
    assert layout.agents_of(("verifier", "reasoning", "verifier")) == ("verifier", "reasoning")
    trainable = layout.init_trainable(cfg, base, adapter, jax.random.key(1))
    assert set(trainable) == set(ROLES3)
    # fresh LoRA (b = 0) adapters differ in their A factors only: one key per role
    a = [jax.tree.leaves(trainable[r])[0] for r in ROLES3]
    assert not np.array_equal(a[0], a[1]) and not np.array_equal(a[1], a[2])
    constants = layout.constants(base, trainable, warm_started=False)
    assert set(constants) == {BASE}
    params = {**trainable, **constants}

    tokens = np.arange(3, 11, dtype=np.int32)[None]
    moved = dict(params, verifier=jax.tree.map(lambda x: x + 0.05, params["verifier"]))
    for role in ROLES3:
        got_base, adapter_r = layout.policy_view(moved, role)
        assert got_base is base and adapter_r.weights is moved[role] and adapter_r.scale == 2.0
        assert layout.reference_view(moved, role) == (base, None)  # fresh LoRA: the bare base
    view_b, adapters = layout.sampling_view(moved)
    assert view_b is base and set(adapters) == set(ROLES3)
    # only the moved agent changes its role's policy
    plain = _logits(cfg, (base, None), tokens)
    np.testing.assert_array_equal(_logits(cfg, (base, adapters["reasoning"]), tokens), plain)
    assert np.abs(_logits(cfg, (base, adapters["verifier"]), tokens) - plain).max() > 1e-4


def test_shared_layout_plays_every_role_with_one_tree_and_copies_the_reference(model):
    cfg, base = model
    layout = AgentLayout(roles=ROLES3, adapter_kind="shared", needs_reference=True)
    assert layout.agents == (SHARED,) and layout.agents_of(ROLES3) == (SHARED,)
    assert (layout.saved_kind, layout.saved_scale) == ("full", 1.0)
    trainable = layout.init_trainable(cfg, base, AdapterConfig(kind="shared"), jax.random.key(0))
    assert trainable[SHARED] is base
    constants = layout.constants(base, trainable, warm_started=False)
    assert set(constants) == {REFERENCE}
    assert tree_bitwise_equal(constants[REFERENCE], base)
    assert jax.tree.leaves(constants[REFERENCE])[0] is not jax.tree.leaves(base)[0]  # a copy
    params = {**trainable, **constants}
    for role in ROLES3:
        assert layout.policy_view(params, role) == (base, None)
        assert layout.reference_view(params, role)[0] is constants[REFERENCE]


def test_reference_copies_only_a_warm_start(model):
    cfg, base = model
    adapter = AdapterConfig(kind="full")
    layout = AgentLayout.for_roles(ROLES3[:2], adapter)
    layout = AgentLayout(layout.roles, layout.adapter_kind, layout.adapter_scale, needs_reference=True)
    trainable = layout.init_trainable(cfg, base, adapter, jax.random.key(0))
    assert set(layout.constants(base, trainable, warm_started=False)) == {BASE}
    warm = layout.constants(base, trainable, warm_started=True)
    assert set(warm) == {BASE, REFERENCE} and set(warm[REFERENCE]) == set(ROLES3[:2])
    ref_base, ref_adapter = layout.reference_view({**trainable, **warm}, "reasoning")
    assert ref_base is base and ref_adapter.weights is warm[REFERENCE]["reasoning"]


def test_needs_reference_is_one_rule_over_the_loss_and_the_kl_reward():
    from test_trainer import tiny_train_config

    from rema_jax.training.config import load_train_config

    def layout(**sections):
        return AgentLayout.from_train_config(load_train_config(tiny_train_config(**sections)))

    assert not layout().needs_reference
    assert layout(loss={"kl_coef": 1e-2}).needs_reference
    assert layout(advantage={"estimator": "reinforce_pp", "kl_coef": 1e-3}).needs_reference
    assert not layout(advantage={"estimator": "grpo", "kl_coef": 1e-3}).needs_reference


def test_bad_layouts_are_refused():
    with pytest.raises(ValueError, match="distinct roles"):
        AgentLayout(roles=("reasoning", "reasoning"), adapter_kind="lora")
    with pytest.raises(ValueError, match="may not be named"):
        AgentLayout(roles=("base", "reasoning"), adapter_kind="lora")
    with pytest.raises(ValueError, match="lora, full or shared"):
        AgentLayout(roles=("reasoning",), adapter_kind="prefix")
    with pytest.raises(KeyError, match="not one of this layout's roles"):
        AgentLayout(roles=("reasoning",), adapter_kind="lora").agent_of("meta_thinking")
