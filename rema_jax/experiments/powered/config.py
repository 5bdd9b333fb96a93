"""The powered experiment's config: ``PoweredConfig`` (SFT stages, RL methods, their warm starts, seeds,
held-out questions, time budget), its cross-checks, ``CostModel`` (the plan's per-unit costs) and
``load_powered_config`` (ConfigDict / dict → validated config, errors naming the dotted path)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from rema_jax.config_utils import ConfigError, from_dict
from rema_jax.sft.train import SFTConfig
from rema_jax.training.bootstrap import BootstrapConfig
from rema_jax.training.config import TrainConfig

STAGES_FILE = "stages.json"
RESULTS_STEM = "powered_experiment"


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Seconds per unit of work on the target machine, for the plan before anything is measured
    (2 shared CPU cores, SmolLM2-135M): one SFT step of one agent (batch 4), one RL step
    (4 questions × 4 samples), one sampler row of a held-out evaluation (greedy; ``eval_rows``
    counts the padding of the batch bucket), and the fixed cost of a stage (model load, compiles)."""

    sft_step_s: float = 13.1
    rl_step_s: float = 54.0
    eval_row_s: float = 1.9
    stage_overhead_s: float = 60.0

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if getattr(self, f.name) < 0:
                raise ValueError(f"{f.name} must be >= 0")


@dataclasses.dataclass(frozen=True)
class PoweredConfig:
    """``sft``: SFT stage name → config; ``rl``: method → RL config (``loop.seed``,
    ``model.init_adapters_from`` and the eval settings are set per run); ``warm_start``: method →
    its SFT stage. ``comparisons``: (a, b) pairs reported as paired differences a − b, the first
    being the headline. ``branches``: method → an earlier method it shares its first steps with (the
    same config but the reward, which differs only for roles the first phases do not train: the
    consistency ablation vs ReMA): its runs start from the parent's checkpoint at ``branch_step``."""

    sft: Mapping[str, SFTConfig]
    rl: Mapping[str, TrainConfig]
    warm_start: Mapping[str, str]
    seeds: tuple[int, ...] = (0, 1, 2)
    heldout_questions: int = 96
    base_eval: bool = False
    time_budget_min: float = 150.0
    n_boot: int = 10_000
    comparisons: tuple[tuple[str, str], ...] = (("ReMA", "VRP_RL"),)
    costs: CostModel = CostModel()
    branches: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not self.rl or not self.sft:
            raise ValueError("needs at least one SFT stage and one RL method")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise ValueError(f"seeds must be distinct non-negative ints, got {self.seeds}")
        if self.heldout_questions < 1 or self.n_boot < 100 or self.time_budget_min < 0:
            raise ValueError("heldout_questions >= 1, n_boot >= 100 and time_budget_min >= 0 (0: no budget)")
        if set(self.warm_start) != set(self.rl):
            raise ValueError(f"warm_start names {sorted(self.warm_start)}, the methods are {sorted(self.rl)}")
        unused = sorted(set(self.sft) - set(self.warm_start.values()))
        unknown = sorted(set(self.warm_start.values()) - set(self.sft))
        if unknown or unused:
            raise ValueError(f"warm_start: unknown SFT stage(s) {unknown}, unused SFT stage(s) {unused}")
        for a, b in self.comparisons:
            if a not in self.rl or b not in self.rl or a == b:
                raise ValueError(f"comparisons: ({a!r}, {b!r}) must name two different methods of {sorted(self.rl)}")
        # each method with its SFT: one model, one adapter layout, one split (bootstrap's checks)
        for method, rl in self.rl.items():
            try:
                BootstrapConfig(sft=self.sft[self.warm_start[method]], rl=rl, heldout_questions=self.heldout_questions)
            except ValueError as e:
                raise ValueError(f"method {method} (from {self.warm_start[method]}): {e}") from None
        first = next(iter(self.rl))
        for method, rl in self.rl.items():  # every method: the same held-out questions and RL budget
            for section, names in (
                ("data", ("source", "families", "levels", "train_per_cell", "test_per_cell", "split_seed")),
                ("model", ("source", "random_init", "dtype")),
                ("loop", ("steps", "questions_per_step")),
                ("optimizer", ("learning_rate",)),
            ):
                for name in names:
                    x, y = (getattr(getattr(c, section), name) for c in (self.rl[first], rl))
                    if x != y:
                        raise ValueError(
                            f"rl.{method}.{section}.{name}={y!r} differs from rl.{first}: "
                            f"{x!r}; the methods must share the held-out split and the RL budget"
                        )
        sft_first = next(iter(self.sft))
        for name, s in self.sft.items():  # every SFT: the same budget on the same worked examples
            for path in (
                "data.families",
                "data.levels",
                "data.train_per_cell",
                "data.examples_per_cell",
                "data.split_seed",
                "loop.epochs",
                "loop.batch_size",
                "loop.seed",
                "optimizer",
            ):
                x, y = (_get(c, path) for c in (self.sft[sft_first], s))
                if x != y:
                    raise ValueError(
                        f"sft.{name}.{path}={y!r} differs from sft.{sft_first}: {x!r}; the "
                        "SFT stages must have the same budget on the same worked examples"
                    )
        for sft_name in self.sft:  # one greedy step-0 eval per SFT serves all its methods
            methods = [m for m, s in self.warm_start.items() if s == sft_name]
            for m in methods[1:]:
                if self.rl[m].rollout != self.rl[methods[0]].rollout:
                    raise ValueError(
                        f"rl.{m}.rollout differs from rl.{methods[0]}.rollout, but both start "
                        f"from {sft_name}, whose held-out evaluation they share"
                    )
        self._check_branches()
        if self.base_eval and not any(c.single_agent for c in self.rl.values()):
            raise ValueError("base_eval evaluates the untrained model with the VRP prompt: needs a single-agent method")

    def _check_branches(self) -> None:
        from rema_jax.experiments.powered.stages import branch_step

        order = list(self.rl)
        for child, parent in self.branches.items():
            where = f"branches.{child}={parent!r}"
            if child not in self.rl or parent not in self.rl or child == parent:
                raise ValueError(f"{where}: must name two different methods of {order}")
            if parent in self.branches or child in self.branches.values():
                raise ValueError(f"{where}: a branch cannot start from another branch, nor be one's parent")
            if order.index(parent) > order.index(child):
                raise ValueError(f"{where}: the parent must come before the branch in the method order {order}")
            if self.warm_start[child] != self.warm_start[parent]:
                raise ValueError(f"{where}: both must start from the same SFT stage")
            a, b = self.rl[parent], self.rl[child]
            if dataclasses.replace(b, reward=a.reward) != a:
                raise ValueError(f"{where}: the two RL configs may differ only in their reward")
            k = branch_step(self, child)
            if k >= b.loop.steps:
                raise ValueError(f"{where}: no trained role's reward differs, the branch would be the same run")
            if k == 0:
                raise ValueError(
                    f"{where}: the runs differ from step 0: nothing to share (a reward that differs only "
                    "for the meta-thinking agent, after an RA phase, can be shared)"
                )
            if k % a.checkpoint.every:
                raise ValueError(f"{where}: rl.{parent}.checkpoint.every={a.checkpoint.every} does not save step {k}")


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def load_powered_config(raw: Any) -> PoweredConfig:
    """``ml_collections.ConfigDict`` / dict → validated ``PoweredConfig`` (``ConfigError`` naming the
    dotted path, e.g. ``config.rl.ReMA.loop.steps``)."""
    from rema_jax.sft.train import load_sft_config
    from rema_jax.training.config import load_train_config

    plain = raw.to_dict() if hasattr(raw, "to_dict") else dict(raw)
    fields = {f.name for f in dataclasses.fields(PoweredConfig)}
    unknown = sorted(set(plain) - fields - {"methods"})
    if unknown:
        raise ConfigError(f"config: unknown key(s) {unknown}; valid keys: {sorted(fields | {'methods'})}")
    for key in ("sft", "rl", "warm_start"):
        if not isinstance(plain.get(key), Mapping):
            raise ConfigError(f"config.{key}: expected a mapping of names to configs")

    def load(fn, value, path):
        try:
            return fn(value)
        except ConfigError as e:
            raise ConfigError(str(e).replace("config", path, 1)) from None

    # ConfigDict sorts its keys: ``methods`` gives the order (stages, tables); SFTs follow their methods
    order = list(plain.get("methods") or plain["rl"])
    if sorted(order) != sorted(plain["rl"]):
        raise ConfigError(f"config.methods={order} must list the methods of config.rl: {sorted(plain['rl'])}")
    sft_order = list(
        dict.fromkeys([plain["warm_start"].get(m) for m in order if m in plain["warm_start"]] + sorted(plain["sft"]))
    )
    sft = {n: load(load_sft_config, plain["sft"][n], f"config.sft.{n}") for n in sft_order if n in plain["sft"]}
    rl = {n: load(load_train_config, plain["rl"][n], f"config.rl.{n}") for n in order}
    rest = {
        k: v
        for k, v in plain.items()
        if k not in ("sft", "rl", "warm_start", "seeds", "costs", "comparisons", "methods", "branches")
    }
    if "seeds" in plain:
        s = plain["seeds"]
        rest["seeds"] = tuple(range(s)) if isinstance(s, int) else tuple(s)
    if "comparisons" in plain:
        rest["comparisons"] = tuple(tuple(p) for p in plain["comparisons"])
    if "costs" in plain:
        rest["costs"] = from_dict(CostModel, plain["costs"], "config.costs")
    if "branches" in plain:
        if not isinstance(plain["branches"], Mapping):
            raise ConfigError("config.branches: expected a mapping of method → parent method")
        rest["branches"] = dict(plain["branches"])
    try:
        return PoweredConfig(sft=sft, rl=rl, warm_start=dict(plain["warm_start"]), **rest)
    except (ValueError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"config: {e}") from None
