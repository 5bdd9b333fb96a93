"""RL core: advantages, turn-level PPO loss, masked multi-agent optax update (pure JAX)."""

from rema_jax.rl.advantages import (
    AdvantageConfig,
    advantage_estimators,
    compute_advantages,
    dr_grpo_advantages,
    frac_reward_zero_std,
    get_advantage_estimator,
    group_reward_metrics,
    grpo_advantages,
    masked_whiten,
    register_advantage_estimator,
    reinforce_pp_advantages,
)
from rema_jax.rl.batch import TrainBatch, as_train_batch
from rema_jax.rl.losses import (
    AGG_MODES,
    KL_ESTIMATORS,
    RATIO_MODES,
    LossConfig,
    head_logprobs_and_entropy,
    kl_estimate,
    loss_normalizers,
    ppo_loss,
    sparse_token_logprobs_and_entropy,
    token_logprobs_and_entropy,
)
from rema_jax.rl.optimizer import (
    MultiAgentOptimizer,
    OptimizerConfig,
    agent_step_count,
    make_schedule,
    tree_bitwise_equal,
)
from rema_jax.rl.prefix_plan import PrefixPlan, plan_prefix
from rema_jax.rl.update import (
    RLState,
    UpdateConfig,
    check_update_batch,
    compute_logprobs_fn,
    init_rl_state,
    make_update_fn,
)
