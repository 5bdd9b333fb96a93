"""Which parameter tree plays each role: the one place SFT and RL read the agent layout from.

Roles (``meta_thinking``, ``reasoning``, ``single``, or any other name the protocol and prompts define)
are data. An *agent* is a trainable parameter tree:

  * ``lora`` / ``full``: one agent per role, named after the role; the frozen base is the constant
    ``BASE``, and a role's policy is ``(base, Adapter(agent tree))``;
  * ``shared``: one agent ``SHARED`` (the whole model) plays every role; its policy is ``(tree, None)``.

The reference policy of a KL term is the policy the run starts from (``REFERENCE``): a frozen copy of
the shared model, or of each role's warm-start adapter; with fresh LoRA adapters it is the bare base
(``lora_b = 0`` makes the adapter the identity), so nothing is copied. ``needs_reference`` is the one
rule that decides whether reference log-probs exist at all; the trainer, the learner and the memory
plan read it from here.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from rema_jax import models
from rema_jax.models.adapters import Adapter, AdapterConfig, init_adapter

SHARED = "shared"
BASE = "base"  # the frozen base parameters (lora / full agents)
REFERENCE = "reference"  # the frozen starting policy (a KL term only)

Params = Any
PolicyView = tuple[Params, Optional[Adapter]]  # (model tree, adapter or None)


@dataclasses.dataclass(frozen=True)
class AgentLayout:
    """roles → agents, the trainable trees and the constants, and each role's policy / reference view.

    roles:           the roles played, in rollout order
    adapter_kind:    "lora" | "full" | "shared"
    adapter_scale:   the LoRA scale alpha / rank (1.0 otherwise)
    needs_reference: a KL term reads reference log-probs (loss or reward side)
    """

    roles: tuple[str, ...]
    adapter_kind: str
    adapter_scale: float = 1.0
    needs_reference: bool = False

    def __post_init__(self):
        if not self.roles or len(set(self.roles)) != len(self.roles):
            raise ValueError(f"AgentLayout needs distinct roles, got {self.roles}")
        if self.adapter_kind not in ("lora", "full", SHARED):
            raise ValueError(f"adapter_kind must be lora, full or shared, got {self.adapter_kind!r}")
        if {SHARED, BASE, REFERENCE} & set(self.roles):
            raise ValueError(f"roles may not be named {SHARED!r}, {BASE!r} or {REFERENCE!r}: {self.roles}")

    @classmethod
    def from_train_config(cls, config) -> "AgentLayout":
        """The layout of an RL run (``TrainConfig``)."""
        kl_reward = config.advantage.estimator == "reinforce_pp" and config.advantage.kl_coef > 0
        return cls(
            roles=tuple(config.rollout.agent_roles),
            adapter_kind=config.adapter.kind,
            adapter_scale=_scale(config.adapter),
            needs_reference=config.loss.kl_coef > 0 or kl_reward,
        )

    @classmethod
    def for_roles(cls, roles: Iterable[str], adapter: AdapterConfig) -> "AgentLayout":
        """The layout of an SFT run (no reference policy)."""
        return cls(roles=tuple(roles), adapter_kind=adapter.kind, adapter_scale=_scale(adapter))

    # ------------------------------------------------------------------ roles → agents
    @property
    def shared(self) -> bool:
        return self.adapter_kind == SHARED

    @property
    def agents(self) -> tuple[str, ...]:
        return (SHARED,) if self.shared else self.roles

    def agent_of(self, role: str) -> str:
        if role not in self.roles:
            raise KeyError(f"role {role!r} is not one of this layout's roles {self.roles}")
        return SHARED if self.shared else role

    def agents_of(self, roles: Iterable[str]) -> tuple[str, ...]:
        """The agents that own ``roles``, in order, without repeats."""
        return tuple(dict.fromkeys(self.agent_of(r) for r in roles))

    @property
    def saved_kind(self) -> str:
        """The kind of the agents' trees on disk (``models.save_adapter``): the shared model is 'full'."""
        return "full" if self.shared else self.adapter_kind

    @property
    def saved_scale(self) -> float:
        return self.adapter_scale if self.saved_kind == "lora" else 1.0

    # ------------------------------------------------------------------ parameters
    def init_trainable(
        self, model_config, base: Params, adapter: AdapterConfig, key: jax.Array, roles: Optional[Iterable[str]] = None
    ) -> dict[str, Params]:
        """Fresh agent trees: the base itself (shared) or one adapter per role (key folded by role index)."""
        if self.shared:
            return {SHARED: base}
        roles = self.roles if roles is None else tuple(roles)
        return {
            r: init_adapter(model_config, base, adapter, jax.random.fold_in(key, i)).weights
            for i, r in enumerate(roles)
        }

    def load_warm_start(self, directory: str, trainable: Mapping[str, Params]) -> dict[str, Params]:
        """``trainable`` with each agent's tree read from ``<directory>/<agent>`` (``models.save_adapter``);
        kind, scale and tree shapes must match the layout (errors name the directory)."""
        out = dict(trainable)
        for agent, tree in trainable.items():
            path = os.path.join(directory, agent)
            loaded = models.load_adapter(path)
            if loaded.kind != self.saved_kind or not np.isclose(loaded.scale, self.saved_scale):
                raise ValueError(
                    f"{path}: adapter {loaded.kind} with scale {loaded.scale}, but the config "
                    f"wants {self.saved_kind} with scale {self.saved_scale}"
                )
            shapes = lambda t: jax.tree.map(lambda x: tuple(x.shape), t)  # noqa: E731
            if shapes(loaded.weights) != shapes(tree):
                raise ValueError(
                    f"{path}: the adapter's tree or shapes differ from the config's adapter (rank, targets or model)"
                )
            out[agent] = jax.tree.map(lambda x, ref: jnp.asarray(x, ref.dtype), loaded.weights, tree)
        return out

    def copies_reference(self, warm_started: bool) -> bool:
        """Whether ``REFERENCE`` holds a copy of the starting trees: a KL term needs the starting policy
        and it is not the bare base (the shared model always; adapters after a warm start)."""
        return self.needs_reference and (self.shared or warm_started)

    def constants(self, base: Params, trainable: Mapping[str, Params], warm_started: bool) -> dict[str, Params]:
        """The frozen trees the policies read: ``BASE`` (adapters) and, when ``copies_reference``,
        ``REFERENCE`` = a copy of the starting agents."""
        out = {} if self.shared else {BASE: base}
        if self.copies_reference(warm_started):
            start = trainable[SHARED] if self.shared else trainable
            out[REFERENCE] = jax.tree.map(jnp.copy, start)
        return out

    # ------------------------------------------------------------------ views
    def adapter(self, weights: Params) -> Adapter:
        return Adapter(weights=weights, kind=self.adapter_kind, scale=self.adapter_scale)

    def agent_view(self, params: Mapping[str, Params], agent: str) -> PolicyView:
        """(model tree, adapter) of ``agent``'s policy; ``params`` = agents' trees + constants."""
        if self.shared:
            return params[SHARED], None
        return params[BASE], self.adapter(params[agent])

    def policy_view(self, params: Mapping[str, Params], role: str) -> PolicyView:
        """(model tree, adapter) of ``role``'s current policy; ``params`` = agents' trees + constants."""
        return self.agent_view(params, self.agent_of(role))

    def reference_view(self, params: Mapping[str, Params], role: str) -> PolicyView:
        """(model tree, adapter) of ``role``'s reference policy (the policy the run starts from)."""
        if self.shared:
            return params[REFERENCE], None
        if REFERENCE in params:
            return params[BASE], self.adapter(params[REFERENCE][self.agent_of(role)])
        return params[BASE], None

    def sampling_view(self, params: Mapping[str, Params]) -> tuple[Params, dict[str, Optional[Adapter]]]:
        """(model tree, {role: adapter or None}) for the sampler; an adapter role without a trained tree
        in ``params`` samples with the base model."""
        if self.shared:
            return params[SHARED], {r: None for r in self.roles}
        return params[BASE], {r: self.adapter(params[r]) if r in params else None for r in self.roles}


def _scale(adapter: AdapterConfig) -> float:
    return adapter.scale if adapter.kind == "lora" else 1.0
