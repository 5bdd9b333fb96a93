"""Turn-level PPO loss, KL to the reference, entropy, and the log-prob utility (jit-able jnp).

Inputs follow Contract 4 (docs/architecture.md): `[B, T]` arrays where position t holds a target
token, `loss_mask` marks this role's generated tokens and `turn_ids` their turn (-1 elsewhere).

Loss (per unit u = a token, or a turn in the turn-ratio modes):
    pg_u = max(-A_u * r_u, -A_u * clip(r_u, 1 - eps, 1 + eps))            (PPO clip, eps = 0.2)
    pg_u = min(pg_u, -A_u * c)   if A_u < 0                               (dual clip, c = 3.0)
    loss = agg(pg) + kl_coef * agg(KL(pi || pi_ref)) - entropy_coef * agg(H)

Ratios:
    token:           r_t = exp(clamp(logp_t - old_t, +-token_log_ratio_clip))
    turn_geometric:  r_k = exp(min(mean_{t in k}(logp_t - old_t), 3.0))       (official code)
    turn_arithmetic: r_k = mean_{t in k} exp(min(logp_t - old_t, 3.0))        (paper Eq. 13)
  and in the turn modes A_k = mean_{t in k} A_t.

Aggregation (per-token auxiliaries KL/H are first averaged per turn in the turn modes):
    token_mean:      sum over tokens / #tokens                  (token ratio only, as the code)
    turn_mean:       sum over turns of (turn value) / #turns    (token ratio: per-turn token means)
    trajectory_mean: sum over sequences of (mean over the sequence's turns, or tokens in the
                     token mode) / #sequences                   (paper Eq. 12, official default)
    seq_mean_token_sum_norm (Dr.GRPO, verl's "seq-mean-token-sum-norm"):
                     loss = 1/#sequences * sum_i (sum_{t in i} x_t) / C,   C = token_sum_norm
                     a constant (default: the most loss tokens a row can hold), so no length
                     normalisation; in the turn modes x_t is the value of t's turn, i.e. a turn
                     counts once per token. (verl divides the micro-batch's token sum by C only;
                     after its micro/mini-batch scaling that is ours times the micro-batch size.)

The denominators (#tokens/#turns/#sequences) can be passed in as `normalizers` computed over a
whole mini-batch, so summing micro-batch losses reproduces the mini-batch loss exactly.

Rows with no loss tokens (padding rows, a role with nothing to train on) count in no numerator or
denominator: #sequences is the number of rows with a loss token, so such a row leaves the loss and
its gradient unchanged (tested). The official code divides by the micro-batch size instead (rows
without loss tokens included), and its token and trajectory modes produce NaN there (0/0); we keep
ours deliberately.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from rema_jax.models.transformer import HeadInputs, head_chunks, matmul_2d

RATIO_MODES = ("token", "turn_geometric", "turn_arithmetic")
AGG_MODES = ("token_mean", "turn_mean", "trajectory_mean", "seq_mean_token_sum_norm")
SUM_NORM = "seq_mean_token_sum_norm"
DEFAULT_AGG_MODE = "trajectory_mean"
KL_ESTIMATORS = ("k1", "k2", "k3")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """PPO loss settings (defaults: the official multi-turn code, spec §3.2).

    ratio_mode: one of RATIO_MODES. agg_mode: one of AGG_MODES ("token_mean" needs "token"), or
    None for the default: "trajectory_mean" (the training config resolves None by the advantage
    estimator: "seq_mean_token_sum_norm" for "dr_grpo"). token_sum_norm: the constant C of
    "seq_mean_token_sum_norm" (required there, rejected with any other mode).
    clip_eps: PPO clip epsilon. dual_clip_c: dual-clip bound for A < 0 (> 1), None disables.
    log_ratio_clip: upper pre-clip of log-ratios in the turn modes (3.0, official).
    token_log_ratio_clip: symmetric clamp of token log-ratios in the token mode (overflow guard).
    kl_coef / kl_estimator / kl_clamp: KL(pi || pi_ref) loss term (k1/k2/k3, fp32, clamped).
    entropy_coef: entropy bonus coefficient (subtracted). temperature: logits divisor for
    log-probs (= the rollout temperature). max_turns: static number of turn segments.
    logprob_chunk_size: time-chunk for the fp32 log-softmax (None: all positions at once).
    """

    ratio_mode: str = "turn_geometric"
    agg_mode: Optional[str] = None
    clip_eps: float = 0.2
    dual_clip_c: Optional[float] = 3.0
    log_ratio_clip: float = 3.0
    token_log_ratio_clip: float = 20.0
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    kl_clamp: float = 10.0
    entropy_coef: float = 0.0
    temperature: float = 1.0
    max_turns: int = 32
    logprob_chunk_size: Optional[int] = None
    token_sum_norm: Optional[float] = None

    def __post_init__(self):
        if self.ratio_mode not in RATIO_MODES:
            raise ValueError(f"LossConfig.ratio_mode={self.ratio_mode!r} is unknown; valid: {RATIO_MODES}")
        if self.agg_mode is not None and self.agg_mode not in AGG_MODES:
            raise ValueError(f"LossConfig.agg_mode={self.agg_mode!r} is unknown; valid: {AGG_MODES} or None")
        if self.token_sum_norm is not None:
            if not self.token_sum_norm > 0:
                raise ValueError(f"LossConfig.token_sum_norm must be > 0 or None, got {self.token_sum_norm}")
            if self.agg_mode not in (None, SUM_NORM):
                raise ValueError(
                    f"LossConfig.token_sum_norm is only used by agg_mode={SUM_NORM!r}, got agg_mode={self.agg_mode!r}"
                )
        if self.ratio_mode != "token" and self.agg_mode == "token_mean":
            raise ValueError(
                f"LossConfig: ratio_mode={self.ratio_mode!r} with agg_mode='token_mean' is rejected "
                "(as in the official code); use 'turn_mean' or 'trajectory_mean'"
            )
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"LossConfig.kl_estimator={self.kl_estimator!r} is unknown; valid: {KL_ESTIMATORS}")
        if not 0 < self.clip_eps < 1:
            raise ValueError(f"LossConfig.clip_eps must be in (0, 1), got {self.clip_eps}")
        if self.dual_clip_c is not None and not self.dual_clip_c > 1:
            raise ValueError(f"LossConfig.dual_clip_c must be > 1 or None, got {self.dual_clip_c}")
        for name in ("log_ratio_clip", "token_log_ratio_clip", "kl_clamp", "temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"LossConfig.{name} must be > 0, got {getattr(self, name)}")
        for name in ("kl_coef", "entropy_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"LossConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not (isinstance(self.max_turns, int) and self.max_turns >= 1):
            raise ValueError(f"LossConfig.max_turns must be an int >= 1, got {self.max_turns!r}")
        if self.logprob_chunk_size is not None and self.logprob_chunk_size < 1:
            raise ValueError(f"LossConfig.logprob_chunk_size must be >= 1 or None, got {self.logprob_chunk_size}")

    @property
    def turn_level(self) -> bool:
        return self.ratio_mode != "token"

    @property
    def agg(self) -> str:
        """The aggregation used: `agg_mode`, or DEFAULT_AGG_MODE when it is None."""
        return DEFAULT_AGG_MODE if self.agg_mode is None else self.agg_mode


# ----------------------------------------------------------------------------------------------
# Log-probs
# ----------------------------------------------------------------------------------------------
def _logp_entropy_block(logits_btv, targets_bt, temperature):
    x = logits_btv.astype(jnp.float32) / temperature
    lse = jax.nn.logsumexp(x, axis=-1)
    tgt = jnp.take_along_axis(x, targets_bt[..., None], axis=-1)[..., 0]
    p = jnp.exp(x - lse[..., None])
    ent = lse - jnp.sum(p * x, axis=-1)
    return tgt - lse, ent


def token_logprobs_and_entropy(logits_btv, tokens_bt, temperature: float = 1.0, *, chunk_size: Optional[int] = None):
    """Per-token log-prob of `tokens_bt` and entropy of the predictive distribution (fp32).

    Contract 4 alignment: logp[:, t] = log_softmax(logits[:, t-1] / T)[tokens[:, t]], the same
    for entropy; position 0 has no prediction and is 0. With `chunk_size`, the fp32 softmax is
    computed over time chunks in a loop, so at most [B, chunk, V] fp32 values live at once.
    Returns (logp_bt, entropy_bt), both float32 [B, T].
    """
    b, t, _ = logits_btv.shape
    if tokens_bt.shape != (b, t):
        raise ValueError(f"tokens_bt shape {tokens_bt.shape} does not match logits {logits_btv.shape}")
    logits = logits_btv[:, :-1]
    targets = tokens_bt[:, 1:].astype(jnp.int32)
    n = t - 1
    if chunk_size is None or chunk_size >= n:
        logp, ent = _logp_entropy_block(logits, targets, temperature)
    else:
        c = int(chunk_size)
        num = -(-n // c)

        def body(i, carry):
            lp_acc, en_acc = carry
            start = jnp.minimum(i * c, n - c)  # the last chunk overlaps; values are identical
            lg = jax.lax.dynamic_slice_in_dim(logits, start, c, axis=1)
            tg = jax.lax.dynamic_slice_in_dim(targets, start, c, axis=1)
            lp, en = _logp_entropy_block(lg, tg, temperature)
            return (
                jax.lax.dynamic_update_slice_in_dim(lp_acc, lp, start, axis=1),
                jax.lax.dynamic_update_slice_in_dim(en_acc, en, start, axis=1),
            )

        zeros = jnp.zeros((b, n), jnp.float32)
        logp, ent = jax.lax.fori_loop(0, num, body, (zeros, zeros))
    pad = jnp.zeros((b, 1), jnp.float32)
    return jnp.concatenate([pad, logp], 1), jnp.concatenate([pad, ent], 1)


def head_logprobs_and_entropy(
    head: HeadInputs,
    targets_bk,
    temperature: float,
    chunk_size: int = 0,
    *,
    trained_head: bool = True,
    entropy_grad: bool = True,
):
    """Log-prob of `targets_bk [B, K]` and entropy at each of the K positions of `head` (the final
    hidden states and the vocabulary projection, `models.HeadInputs`), float32 `[B, K]` each.

    `chunk_size` 0: one block, `_logp_entropy_block(head.logits(), ...)`. `chunk_size` c > 0: the K
    positions are split into n = ceil(K / c) equal chunks (K padded by < n positions) and a
    `lax.map` projects and log-softmaxes one chunk at a time, so at most `[B, ceil(K / n), V]`
    float32 values live at once, in the forward and in the backward pass. Its gradient:
      - the head weight is not trained (`trained_head=False`: a LoRA agent's frozen base) and the
        entropy has no gradient (`entropy_grad=False`: `entropy_coef == 0`): `_frozen_head_chunks`,
        which forms d logp / d h in the forward pass; the cost is the single block's;
      - otherwise `jax.checkpoint` per chunk: the backward pass recomputes the chunk's logits (one
        more `[B K, H] x [H, V]` product than the single block).
    The values are the single block's (per-position math; the matmul's row count differs).
    """
    h_bkh = head.hidden_bkh
    b, k, hdim = h_bkh.shape
    n, c = head_chunks(k, chunk_size)
    if n == 1:
        return _logp_entropy_block(head.logits(), targets_bk, temperature)
    pad = n * c - k
    h_nbch = jnp.pad(h_bkh, ((0, 0), (0, pad), (0, 0))).reshape(b, n, c, hdim).swapaxes(0, 1)
    t_nbc = jnp.pad(targets_bk, ((0, 0), (0, pad))).reshape(b, n, c).swapaxes(0, 1)
    unchunk = lambda x_nbc: x_nbc.swapaxes(0, 1).reshape(b, n * c)[:, :k]  # noqa: E731
    if not trained_head and not entropy_grad:
        logp_nbc, ent_nbc = _frozen_head_chunks(head, h_nbch, t_nbc, temperature)
        return unchunk(logp_nbc), unchunk(ent_nbc)

    @jax.checkpoint
    def chunk(h_bch, t_bc):
        return _logp_entropy_block(head.logits(h_bch), t_bc, temperature)

    logp_nbc, ent_nbc = jax.lax.map(lambda ht: chunk(*ht), (h_nbch, t_nbc))
    return unchunk(logp_nbc), unchunk(ent_nbc)


def _frozen_head_chunks(head: HeadInputs, h_nbch, t_nbc, temperature: float):
    """`lax.map` over the chunks of the log-prob and entropy of a head whose weight is not trained,
    with a custom VJP for the hidden states only: the forward pass also forms, per position,
        G = d logp / d h = (W[:, target] - sum_v p_v W[:, v]) / T        ([B, c, H], from p @ W^T),
    so the backward is dh = g_logp * G: no logits are kept or recomputed, and the cost is the
    single block's (the product p @ W^T replaces the backward's (onehot - p) / T @ W^T). The
    entropy's gradient is taken as zero (use only where it is not trained: `entropy_coef == 0`).
    Differentiating the weight through it is an error (it is closed over, never a VJP input: JAX
    raises UnexpectedTracerError), never a silent zero gradient."""
    weight, tied, h_dtype = head.weight, head.tied, h_nbch.dtype

    def chunk(ht):
        h_bch, t_bc = ht
        x = head.logits(h_bch) / temperature
        lse = jax.nn.logsumexp(x, axis=-1)
        p = jnp.exp(x - lse[..., None])
        logp = jnp.take_along_axis(x, t_bc[..., None], axis=-1)[..., 0] - lse
        ent = lse - jnp.sum(p * x, axis=-1)
        w = weight.astype(jnp.float32)
        if tied:  # weight [V, H]
            w_t, p_w = w[t_bc], matmul_2d(p, w)
        else:  # weight [H, V]
            w_t, p_w = jnp.moveaxis(jnp.take(w, t_bc, axis=1), 0, -1), matmul_2d(p, w.T)
        return logp, ent, (w_t - p_w) / temperature

    @jax.custom_vjp
    def logp_ent(h_nbch):
        logp, ent, _ = jax.lax.map(chunk, (h_nbch, t_nbc))
        return logp, ent

    def fwd(h_nbch):
        logp, ent, g = jax.lax.map(chunk, (h_nbch, t_nbc))
        return (logp, ent), g

    def bwd(g_nbch, cts):
        g_logp, _ = cts
        return ((g_logp[..., None] * g_nbch).astype(h_dtype),)

    logp_ent.defvjp(fwd, bwd)
    return logp_ent(h_nbch)


def sparse_token_logprobs_and_entropy(
    logits_at_fn,
    tokens_bt,
    loss_mask_bt,
    max_loss_tokens: int,
    temperature: float = 1.0,
    *,
    chunk_size: int = 0,
    trained_head: bool = True,
    entropy_grad: bool = True,
):
    """`token_logprobs_and_entropy` evaluated only at loss positions (same values there, 0 elsewhere).

    `logits_at_fn(positions_bk)` returns the logits `[B, K, V]` at the given time indices (e.g.
    `models.forward(..., logits_at_bk=...)`), or their `models.HeadInputs` (`head_inputs=True`),
    which `head_logprobs_and_entropy` projects `chunk_size` positions at a time (`trained_head`,
    `entropy_grad`: whether the head weight and the entropy need gradients; see there). The first
    `max_loss_tokens` loss positions of each row (static K) are gathered, so the vocabulary
    projection and fp32 log-softmax run on [B, K, V] instead of [B, T, V]; RL sequences are mostly
    prompt, so this is several times cheaper. Rows with more than K loss tokens must be rejected by
    the caller before tracing (values past K would be dropped).
    Returns (logp_bt, entropy_bt) float32 [B, T], Contract 4 aligned.
    """
    b, t = tokens_bt.shape
    k = int(max_loss_tokens)
    mask = jnp.asarray(loss_mask_bt) > 0
    mask = mask.at[:, 0].set(False)  # position 0 has no prediction
    order_bk = jnp.argsort(~mask, axis=1, stable=True)[:, :k]  # loss positions first, in order
    valid_bk = jnp.take_along_axis(mask, order_bk, axis=1)
    pos_bk = jnp.where(valid_bk, order_bk, 1)
    out = logits_at_fn(pos_bk - 1)
    targets_bk = jnp.take_along_axis(tokens_bt.astype(jnp.int32), pos_bk, axis=1)
    if isinstance(out, HeadInputs):
        logp_bk, ent_bk = head_logprobs_and_entropy(
            out, targets_bk, temperature, chunk_size, trained_head=trained_head, entropy_grad=entropy_grad
        )
    else:
        logp_bk, ent_bk = _logp_entropy_block(out, targets_bk, temperature)
    rows = jnp.arange(b)[:, None]
    zeros = jnp.zeros((b, t), jnp.float32)
    logp_bt = zeros.at[rows, pos_bk].add(jnp.where(valid_bk, logp_bk, 0.0))
    ent_bt = zeros.at[rows, pos_bk].add(jnp.where(valid_bk, ent_bk, 0.0))
    return logp_bt, ent_bt


def kl_estimate(logp_bt, ref_logp_bt, estimator: str = "k3", clamp: float = 10.0):
    """Per-token estimate of KL(pi || pi_ref) from samples of pi, in fp32, clamped to +-clamp.

    k1 = logp - ref;  k2 = 0.5 (logp - ref)^2;  k3 = exp(ref - logp) - (ref - logp) - 1
    (k3 is verl's `low_var_kl`).
    """
    d = logp_bt.astype(jnp.float32) - ref_logp_bt.astype(jnp.float32)
    if estimator == "k1":
        kl = d
    elif estimator == "k2":
        kl = 0.5 * d * d
    elif estimator == "k3":
        kl = jnp.exp(-d) + d - 1.0
    else:
        raise ValueError(f"kl_estimator={estimator!r} is unknown; valid: {KL_ESTIMATORS}")
    return jnp.clip(kl, -clamp, clamp)


# ----------------------------------------------------------------------------------------------
# Segments
# ----------------------------------------------------------------------------------------------
def _turn_segments(mask_bt, turn_ids_bt, max_turns: int):
    """Flat segment id b * K + k per loss token (dump segment B*K elsewhere) and B*K."""
    b = mask_bt.shape[0]
    valid = (mask_bt > 0) & (turn_ids_bt >= 0) & (turn_ids_bt < max_turns)
    seg = jnp.arange(b)[:, None] * max_turns + jnp.clip(turn_ids_bt, 0, max_turns - 1)
    return jnp.where(valid, seg, b * max_turns), b * max_turns


def _turn_sum(x_bt, seg, nseg, b, k):
    return jax.ops.segment_sum(x_bt.reshape(-1), seg.reshape(-1), num_segments=nseg + 1)[:nseg].reshape(b, k)


def loss_normalizers(loss_mask_bt, turn_ids_bt, max_turns: int) -> dict:
    """Counts used as loss denominators: loss tokens, valid turns, sequences with a loss token.

    Tokens outside [0, max_turns) turns are ignored in every count, like in the loss.
    """
    mask = (loss_mask_bt > 0) & (turn_ids_bt >= 0) & (turn_ids_bt < max_turns)
    seg, nseg = _turn_segments(mask.astype(jnp.float32), turn_ids_bt, max_turns)
    b = mask.shape[0]
    cnt_bk = _turn_sum(mask.astype(jnp.float32), seg, nseg, b, max_turns)
    return {
        "tokens": mask.sum().astype(jnp.float32),
        "turns": (cnt_bk > 0).sum().astype(jnp.float32),
        "seqs": (cnt_bk.sum(1) > 0).sum().astype(jnp.float32),
    }


# ----------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------
def _clipped_pg(adv, ratio, cfg: LossConfig):
    """(pg, clipped?, dual-clipped?) elementwise; see the module docstring."""
    pg1 = -adv * ratio
    pg2 = -adv * jnp.clip(ratio, 1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps)
    pg = jnp.maximum(pg1, pg2)
    clipped = pg2 > pg1
    if cfg.dual_clip_c is None:
        return pg, clipped, jnp.zeros_like(clipped)
    pg3 = -adv * cfg.dual_clip_c
    dual = (adv < 0) & (pg3 < pg)
    return jnp.where(adv < 0, jnp.minimum(pg, pg3), pg), clipped, dual


def ppo_loss(
    logp_bt,
    old_logp_bt,
    adv_bt,
    loss_mask_bt,
    turn_ids_bt,
    cfg: LossConfig,
    *,
    entropy_bt=None,
    ref_logp_bt=None,
    normalizers: Optional[dict] = None,
):
    """Turn-level / token-level PPO loss (see module docstring). Returns (loss, metrics).

    logp_bt: current log-probs (differentiated); old_logp_bt: recomputed old policy log-probs;
    adv_bt: token advantages; entropy_bt / ref_logp_bt optional. `normalizers` (from
    `loss_normalizers` over a whole mini-batch) replaces the local denominators.
    Metrics (scalars): pg_loss, loss, clip_frac, dual_clip_frac, approx_kl (mean old - logp
    over tokens), ratio_mean / ratio_max (over units), entropy, kl_ref (when given).
    """
    f32 = jnp.float32
    b, _ = logp_bt.shape
    k = cfg.max_turns
    agg_mode = cfg.agg
    if agg_mode == SUM_NORM and cfg.token_sum_norm is None:
        raise ValueError(f"LossConfig.agg_mode={SUM_NORM!r} needs token_sum_norm (the constant C)")
    if agg_mode != SUM_NORM and cfg.token_sum_norm is not None:
        raise ValueError(
            f"LossConfig.token_sum_norm is only used by agg_mode={SUM_NORM!r}, "
            f"got agg_mode={cfg.agg_mode!r} (-> {agg_mode!r})"
        )
    mask = ((loss_mask_bt > 0) & (turn_ids_bt >= 0) & (turn_ids_bt < k)).astype(f32)
    seg, nseg = _turn_segments(mask, turn_ids_bt, k)
    local = normalizers is None
    norms = loss_normalizers(mask, turn_ids_bt, k) if local else normalizers
    tok_den = jnp.maximum(norms["tokens"], 1.0)
    turn_den = jnp.maximum(norms["turns"], 1.0)
    seq_den = jnp.maximum(norms["seqs"], 1.0)
    cnt_bk = _turn_sum(mask, seg, nseg, b, k)
    turn_valid = (cnt_bk > 0).astype(f32)
    seq_tok = mask.sum(1)
    seq_turns = turn_valid.sum(1)

    def tsum(x):  # [B, T] -> [B, K] masked per-turn sums
        return _turn_sum(x * mask, seg, nseg, b, k)

    def agg_tokens(x_bt):
        """Aggregate a per-token quantity (in the turn modes: per-turn means first)."""
        if agg_mode == SUM_NORM:  # = agg_turns of the per-turn means
            return jnp.sum(x_bt * mask) / (cfg.token_sum_norm * seq_den)
        if agg_mode == "token_mean":
            return jnp.sum(x_bt * mask) / tok_den
        if agg_mode == "turn_mean" or cfg.turn_level:
            turn_mean = tsum(x_bt) / jnp.maximum(cnt_bk, 1.0)
            return agg_turns(turn_mean)
        # token ratio + trajectory_mean: per-sequence token mean, then mean over sequences
        return jnp.sum(jnp.sum(x_bt * mask, 1) / jnp.maximum(seq_tok, 1.0)) / seq_den

    def agg_turns(v_bk):
        if agg_mode == SUM_NORM:  # each turn's value once per token of the turn
            return jnp.sum(v_bk * cnt_bk) / (cfg.token_sum_norm * seq_den)
        if agg_mode == "turn_mean":
            return jnp.sum(v_bk * turn_valid) / turn_den
        # trajectory_mean: mean over the sequence's turns, then over sequences
        per_seq = jnp.sum(v_bk * turn_valid, 1) / jnp.maximum(seq_turns, 1.0)
        return jnp.sum(per_seq) / seq_den

    logp = logp_bt.astype(f32)
    old = old_logp_bt.astype(f32)
    adv = adv_bt.astype(f32)
    log_ratio = logp - old
    if cfg.ratio_mode == "token":
        ratio = jnp.exp(jnp.clip(log_ratio, -cfg.token_log_ratio_clip, cfg.token_log_ratio_clip))
        pg, clipped, dual = _clipped_pg(adv, ratio, cfg)
        pg_loss = agg_tokens(pg)
        unit_mask, unit_den = mask, jnp.maximum(mask.sum(), 1.0)
    else:
        a_k = tsum(adv) / jnp.maximum(cnt_bk, 1.0)
        if cfg.ratio_mode == "turn_geometric":
            mean_lr = tsum(log_ratio) / jnp.maximum(cnt_bk, 1.0)
            ratio = jnp.exp(jnp.minimum(mean_lr, cfg.log_ratio_clip))
        else:  # turn_arithmetic
            tok_ratio = jnp.exp(jnp.minimum(log_ratio, cfg.log_ratio_clip))
            ratio = tsum(tok_ratio) / jnp.maximum(cnt_bk, 1.0)
        pg, clipped, dual = _clipped_pg(a_k, ratio, cfg)
        pg_loss = agg_turns(pg)
        unit_mask, unit_den = turn_valid, jnp.maximum(turn_valid.sum(), 1.0)

    loss = pg_loss
    local_tok = jnp.maximum(mask.sum(), 1.0)
    metrics = {
        "pg_loss": pg_loss,
        "clip_frac": jnp.sum(clipped * unit_mask) / unit_den,
        "dual_clip_frac": jnp.sum(dual * unit_mask) / unit_den,
        "approx_kl": jnp.sum(-log_ratio * mask) / local_tok,
        "ratio_mean": jnp.sum(ratio * unit_mask) / unit_den,
        "ratio_max": jnp.max(jnp.where(unit_mask > 0, ratio, 0.0)),  # ratios are > 0
    }
    if ref_logp_bt is not None:
        kl = kl_estimate(logp, ref_logp_bt, cfg.kl_estimator, cfg.kl_clamp)
        metrics["kl_ref"] = jnp.sum(kl * mask) / local_tok
        if cfg.kl_coef > 0:
            loss = loss + cfg.kl_coef * agg_tokens(kl)
    elif cfg.kl_coef > 0:
        raise ValueError("LossConfig.kl_coef > 0 but no ref_logp_bt was given")
    if entropy_bt is not None:
        ent = entropy_bt.astype(f32)
        metrics["entropy"] = jnp.sum(ent * mask) / local_tok
        if cfg.entropy_coef > 0:
            loss = loss - cfg.entropy_coef * agg_tokens(ent)
    elif cfg.entropy_coef > 0:
        raise ValueError("LossConfig.entropy_coef > 0 but no entropy_bt was given")
    metrics["loss"] = loss
    return loss, metrics
