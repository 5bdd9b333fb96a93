"""Sampler tests on tiny random models: cache-path logits, padding, stops, seeds, sampling ops, compiles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rema_jax.models import forward, layers
from rema_jax.models.adapters import Adapter, AdapterConfig, init_adapter
from rema_jax.models.config import Llama3RopeScaling, ModelConfigError
from rema_jax.models.testing import random_params, tiny_config
from rema_jax.sampling import Generation, Sampler, SamplingParams, kernel, ops, stops

MERGES = [("[", "F"), ("I", "N"), ("I", "S"), ("IS", "H"), ("H", "]"), ("Ġ", "a"), ("b", "c")]


def _tiny_tokenizer():
    """A byte-level BPE tokenizer over printable ASCII (every id decodes to ASCII), with merges that
    split "[FINISH]" across several tokens, wrapped as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for ch in ["Ġ"] + [chr(c) for c in range(ord("!"), ord("~") + 1)]:
        vocab[ch] = len(vocab)
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=MERGES))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


TOKENIZER = _tiny_tokenizer()
CFG = tiny_config(vocab_size=len(TOKENIZER))
PARAMS = random_params(CFG, jax.random.key(0))
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27], [40, 41]]


@pytest.fixture(scope="module")
def sampler():
    return Sampler(CFG, TOKENIZER, max_cache_len=256)


def _lora(seed, config=CFG, params=PARAMS):
    """A LoRA adapter with nonzero B, so it changes the model."""
    ad = init_adapter(config, params, AdapterConfig(rank=4, alpha=8.0), jax.random.key(seed))
    w = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(seed + 1), x.shape), ad.weights)
    return Adapter(weights=w, kind="lora", scale=ad.scale)


# --------------------------------------------------------------------------- kernel vs forward
@pytest.mark.parametrize(
    "variant", ["llama", "llama3_rope_scaling", "qwen2_bias_tied", "lora", "qwen2_bias_tied 3 blocks", "lora 3 blocks"]
)
def test_cache_decode_logits_equal_full_forward(variant):
    """Prefill + decode (the only KV-cache path) vs the uncached training forward, left-padded rows:
    against the padded batch under its mask and against each row alone, unpadded. "3 blocks": every
    fused kernel (and the tied head) cut into 3 uneven column blocks."""
    cfg, adapter = CFG, None
    blocks = 3 if variant.endswith("3 blocks") else 1
    variant = variant.removesuffix(" 3 blocks")
    if variant == "qwen2_bias_tied":
        cfg = tiny_config(vocab_size=CFG.vocab_size, family="qwen2", attention_bias=True, tie_word_embeddings=True)
    if variant == "llama3_rope_scaling":
        cfg = tiny_config(vocab_size=CFG.vocab_size, rope_scaling=Llama3RopeScaling(8.0, 1.0, 4.0, 16))
    params = random_params(cfg, jax.random.key(3))
    if variant == "lora":
        adapter = _lora(7, cfg, params)
    fp = kernel.fuse_params(cfg, params, adapter, blocks)
    assert all(len(w) == blocks for w in (fp.lm_head_hv, fp.layers[0].w_qkv, fp.layers[0].w_down))
    rng = np.random.default_rng(0)
    p, n_new = 8, 5
    pad = np.array([3, 0, 6], np.int32)
    tokens = rng.integers(3, cfg.vocab_size, size=(3, p + n_new)).astype(np.int32)
    tokens[:, :p][np.arange(p)[None] < pad[:, None]] = 0
    mask = (np.arange(p + n_new)[None] >= pad[:, None]).astype(np.int32)
    ref = np.asarray(forward(cfg, params, jnp.asarray(tokens), adapter, attention_mask=jnp.asarray(mask)))
    alone = [np.asarray(forward(cfg, params, jnp.asarray(tokens[i : i + 1, pad[i] :]), adapter))[0] for i in range(3)]
    caches, logits = kernel.prefill(cfg, fp, jnp.asarray(tokens[:, :p]), jnp.asarray(pad), p + n_new)
    assert len(caches) == cfg.num_layers and isinstance(caches[0], layers.KVCache)
    assert (caches[0].k.shape, caches[0].v.shape) == layers.kv_cache_shapes(cfg, 3, p + n_new)
    assert caches[0].k.dtype == layers.kv_cache_dtype(cfg)
    np.testing.assert_allclose(np.asarray(logits), ref[:, p - 1], atol=2e-5, rtol=1e-5)
    for t in range(n_new):
        caches, logits = kernel.decode_step(
            cfg, fp, caches, jnp.asarray(tokens[:, p + t]), jnp.asarray(p - pad + t), p + t, jnp.asarray(pad)
        )
        np.testing.assert_allclose(np.asarray(logits), ref[:, p + t], atol=2e-5, rtol=1e-5)
        for i in range(3):
            np.testing.assert_allclose(np.asarray(logits)[i], alone[i][p - pad[i] + t], atol=2e-5, rtol=1e-5)


def test_shared_prefix_prefill_and_decode_equal_full_forward():
    """Prefix computed once in slots [0, S), left-padded remainders after it: logits at the last
    prompt position and every decode step equal the uncached forward of each whole row."""
    cfg, params = CFG, PARAMS
    fp = kernel.fuse_params(cfg, params, None)
    rng = np.random.default_rng(1)
    s_len, q, n_new = 6, 8, 4
    pad = np.array([2, 0, 5], np.int32)
    prefix = rng.integers(3, cfg.vocab_size, size=(s_len,)).astype(np.int32)
    rest = rng.integers(3, cfg.vocab_size, size=(3, q + n_new)).astype(np.int32)
    rest[:, :q][np.arange(q)[None] < pad[:, None]] = 0
    caches, logits = kernel.prefill(
        cfg, fp, jnp.asarray(rest[:, :q]), jnp.asarray(pad), s_len + q + n_new, jnp.asarray(prefix[None])
    )
    for i in range(3):
        row = np.concatenate([prefix, rest[i, pad[i] :]])
        ref = np.asarray(forward(cfg, params, jnp.asarray(row[None]))[0])
        real = s_len + q - pad[i]
        np.testing.assert_allclose(np.asarray(logits)[i], ref[real - 1], atol=2e-5, rtol=1e-5)
    refs = [
        np.asarray(forward(cfg, params, jnp.asarray(np.concatenate([prefix, rest[i, pad[i] :]])[None]))[0])
        for i in range(3)
    ]
    for t in range(n_new):
        caches, logits = kernel.decode_step(
            cfg,
            fp,
            caches,
            jnp.asarray(rest[:, q + t]),
            jnp.asarray(s_len + q - pad + t),
            s_len + q + t,
            jnp.asarray(pad),
            s_len,
        )
        for i in range(3):
            np.testing.assert_allclose(np.asarray(logits)[i], refs[i][s_len + q - pad[i] + t], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("greedy", [True, False])
def test_shared_prefix_gives_the_same_generations_and_less_prefill(greedy):
    rng = np.random.default_rng(2)
    system = rng.integers(3, CFG.vocab_size, size=40).tolist()
    prompts = [system + rng.integers(3, CFG.vocab_size, size=n).tolist() for n in (3, 9, 1, 6)]
    sp = SamplingParams(max_new_tokens=10, greedy=greedy, temperature=0.8, ignore_eos=True)
    ad = _lora(5)
    shared = Sampler(CFG, TOKENIZER, max_cache_len=128)
    plain = Sampler(CFG, TOKENIZER, max_cache_len=128, share_prefix=False)
    a = shared.generate(PARAMS, ad, prompts, sp, seed=np.array([1, 2, 3, 4]))
    b = plain.generate(PARAMS, ad, prompts, sp, seed=np.array([1, 2, 3, 4]))
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    for x, y in zip(a, b):
        np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-4)
    # prefix 40 -> 32 shared slots once + 4 rows x 24 (longest remainder 17), instead of 4 rows x 64
    assert shared.stats.prefill_slots == 32 + 4 * 24 and plain.stats.prefill_slots == 4 * 64
    alone = shared.generate(PARAMS, ad, prompts[2:3], sp, seed=np.array([3]))[0]  # no prefix path alone
    assert alone.token_ids == a[2].token_ids


def test_grouped_prefixes_and_repeated_prompts_prefill_like_the_full_forward():
    """Two groups' prefixes run once each, three distinct remainders once each, five rows (two prompts
    repeated): every row's prefill logits and decode steps equal the uncached forward of its prompt."""
    cfg, params = CFG, PARAMS
    fp = kernel.fuse_params(cfg, params, None)
    rng = np.random.default_rng(7)
    s_len, q, n_new = 6, 8, 3
    prefixes = rng.integers(3, cfg.vocab_size, size=(2, s_len)).astype(np.int32)
    group_u = np.array([0, 1, 1], np.int32)
    pad_u = np.array([2, 0, 5], np.int32)
    rest = rng.integers(3, cfg.vocab_size, size=(3, q)).astype(np.int32)
    rest[np.arange(q)[None] < pad_u[:, None]] = 0
    prompt_b = np.array([1, 0, 1, 2, 0], np.int32)
    caches, logits = kernel.prefill(
        cfg, fp, jnp.asarray(rest), jnp.asarray(pad_u), s_len + q + n_new, jnp.asarray(prefixes),
        jnp.asarray(group_u), jnp.asarray(prompt_b),
    )  # fmt: skip
    assert logits.shape[0] == caches[0].k.shape[0] == 5
    nxt = rng.integers(3, cfg.vocab_size, size=(5, n_new)).astype(np.int32)
    rows = [np.concatenate([prefixes[group_u[u]], rest[u, pad_u[u] :], nxt[i]]) for i, u in enumerate(prompt_b)]
    refs = [np.asarray(forward(cfg, params, jnp.asarray(r[None]))[0]) for r in rows]
    pad_b = pad_u[prompt_b]
    own = s_len + q - pad_b  # each row's real prompt length
    for i in range(5):
        np.testing.assert_allclose(np.asarray(logits)[i], refs[i][own[i] - 1], atol=2e-5, rtol=1e-5)
    for t in range(n_new):
        caches, logits = kernel.decode_step(
            cfg, fp, caches, jnp.asarray(nxt[:, t]), jnp.asarray(own + t), s_len + q + t, jnp.asarray(pad_b), s_len
        )
        for i in range(5):
            np.testing.assert_allclose(np.asarray(logits)[i], refs[i][own[i] + t], atol=2e-5, rtol=1e-5)


def test_bf16_sampler_weights_accumulate_in_fp32_and_stay_close_to_the_fp32_model():
    """`sampler_weight_dtype='bfloat16'`: the fused matrices and embedding are bf16, norms fp32; the
    prefill and decode logits are the fp32 model's to bf16 rounding (and not bit-equal: the narrow
    path is taken), and generation runs end to end."""
    cfg = CFG.replace(sampler_weight_dtype="bfloat16")
    with pytest.raises(ModelConfigError, match="sampler_weight_dtype"):
        CFG.replace(sampler_weight_dtype="bf16")
    ad = _lora(4)
    fp = kernel.fuse_params(cfg, PARAMS, ad, column_blocks=2)
    layer = fp.layers[0]
    assert {w.dtype for w in (*layer.w_qkv, *layer.w_o, *layer.w_gate_up, *layer.w_down, *fp.lm_head_hv)} == {
        jnp.dtype(jnp.bfloat16)
    }
    assert fp.embed_vh.dtype == jnp.bfloat16 and layer.ln1.dtype == jnp.float32
    rng = np.random.default_rng(5)
    tokens = rng.integers(3, CFG.vocab_size, size=(2, 12)).astype(np.int32)
    caches, logits = kernel.prefill(cfg, fp, jnp.asarray(tokens[:, :10]), jnp.zeros((2,), jnp.int32), 16)
    assert logits.dtype == jnp.float32 and caches[0].k.dtype == jnp.float32
    caches, step = kernel.decode_step(
        cfg, fp, caches, jnp.asarray(tokens[:, 10]), jnp.full((2,), 10), 10, jnp.zeros((2,), jnp.int32)
    )
    ref = np.asarray(forward(CFG, PARAMS, jnp.asarray(tokens[:, :11]), adapter=ad))
    for got, want in ((logits, ref[:, 9]), (step, ref[:, 10])):
        err = np.abs(np.asarray(got) - want).max()
        assert 1e-4 < err < 0.05 * np.abs(want).max(), (err, np.abs(want).max())  # 0.02 measured; fp32: ~1e-6
    sp = SamplingParams(max_new_tokens=6, temperature=1.0, ignore_eos=True)
    gens = Sampler(cfg, TOKENIZER, max_cache_len=64).generate(PARAMS, ad, [tokens[0].tolist()], sp, seed=1)
    assert len(gens[0].token_ids) == 6 and np.all(np.isfinite(gens[0].logprobs))


def test_plan_prompts_runs_each_prompt_once_and_picks_the_cheapest_prefix():
    from rema_jax.sampling.sampler import plan_prompts

    buckets = (1, 2, 4, 8, 16)
    system = list(range(100, 140))  # 40 tokens every prompt shares
    questions = [system + list(range(200, 230)), system + list(range(300, 330))]  # 70 tokens each
    plans = [[400 + i] * 20 for i in range(4)]
    # the reasoning agent's rows of one step: 2 questions x 2 plans x 2 solutions (each prompt twice)
    rows = [questions[i // 4] + plans[(i // 2) % 4] for i in range(8)]
    plan = plan_prompts(rows, buckets)
    assert plan.prompt_of_row == [0, 0, 1, 1, 2, 2, 3, 3] and [rows[0], rows[2], rows[4], rows[6]] == plan.prompts
    # per question 70 shared tokens -> S = 64 (2 groups) and remainders of <= 26 -> Q = 32:
    # 2 x 64 + 4 x 32 = 256 token passes, against 8 rows x 96 without sharing
    assert (plan.prefix_len, plan.remainder_len, plan.group_of_prompt) == (64, 32, [0, 0, 1, 1])
    assert plan.prefixes == [questions[0][:64], questions[1][:64]] and plan.prefill_slots == 256
    plain = plan_prompts(rows, buckets, share=False)
    assert plain.prompts == rows and plain.prefix_len == 0 and plain.prefill_slots == 8 * 96
    one = plan_prompts([rows[0]] * 4, buckets)  # one distinct prompt: run once, no prefix
    assert (one.prompt_of_row, one.prefix_len, one.remainder_len, one.prefill_slots) == ([0] * 4, 0, 96, 96)


def test_fit_plan_lays_prompts_out_in_another_programs_lengths():
    from rema_jax.sampling.sampler import fit_plan, plan_prompts

    system = list(range(100, 140))
    questions = [system + list(range(200, 230)), system + list(range(300, 330))]  # 70 tokens each
    rows = [questions[i // 2] + [400 + i] * 20 for i in range(4)]  # 90 tokens, 4 distinct prompts
    plan = plan_prompts(rows, (1, 2, 4, 8))
    assert (plan.prefix_len, plan.remainder_len, plan.group_bucket, plan.prefill_slots) == (64, 32, 2, 256)
    wider = fit_plan(plan, 32, 64, 2)  # one 32-token prefix (the system prompt) in a 2-group program
    assert wider.prefixes == [system[:32]] and wider.group_of_prompt == [0] * 4 and wider.prefill_slots == 320
    assert wider.prompts == plan.prompts and wider.prompt_of_row == plan.prompt_of_row
    whole = fit_plan(plan, 0, 96, 0)
    assert (whole.prefixes, whole.prefix_len, whole.prefill_slots) == ([], 0, 4 * 96)
    assert fit_plan(plan, 64, 16, 2) is None  # remainders of 26 tokens in 16 slots
    assert fit_plan(plan, 80, 32, 2) is None  # 4 distinct 80-token prefixes, 2 groups
    assert fit_plan(plan, 96, 32, 4) is None  # no prompt token after the prefix
    assert fit_plan(plan, 0, 64, 0) is None and fit_plan(plan, 0, 96, 1) is None


@pytest.mark.parametrize("greedy", [True, False])
def test_a_run_prefill_layout_is_reused_within_its_cost_limit_with_the_same_tokens(greedy):
    """A call whose prompts fit a prefill layout run before, at most `sampler_layout_reuse` (1.5) times
    its own layout's slots, runs in it (no new prefill or decode program) and samples what a fresh sampler
    samples; a costlier fit compiles the call's own layout; a sampler given the layout record chooses
    as the one that wrote it."""
    rng = np.random.default_rng(4)
    system = rng.integers(3, CFG.vocab_size, size=40).tolist()
    prompts = lambda tails: [system + rng.integers(3, CFG.vocab_size, size=n).tolist() for n in tails]  # noqa: E731
    sp = SamplingParams(max_new_tokens=10, greedy=greedy, temperature=0.8, ignore_eos=True)
    seeds = np.array([1, 2, 3, 4])
    a, b, c = prompts((3, 40, 1, 6)), prompts((3, 20, 1, 6)), prompts((3, 5, 1, 2))
    s = Sampler(CFG, TOKENIZER, max_cache_len=128)
    s.generate(PARAMS, None, a, sp, seed=seeds)  # own layout: S 32, Q 48 -> 32 + 4 x 48 = 224 slots
    assert s.layout_record() == [[4, 4, 1, 32, 48, 128]]
    count, record = s.compile_count, s.layout_record()
    s.reset_stats()
    got = s.generate(PARAMS, None, b, sp, seed=seeds)  # own layout: Q 32, 160 slots; 224 <= 1.5 x 160
    assert 224 <= CFG.sampler_layout_reuse * 160 and s.stats.prefill_slots == 224 and s.compile_count == count
    fresh = Sampler(CFG, TOKENIZER, max_cache_len=128)
    want = fresh.generate(PARAMS, None, b, sp, seed=seeds)
    assert fresh.stats.prefill_slots == 160
    assert [g.token_ids for g in got] == [g.token_ids for g in want]
    for x, y in zip(got, want):
        np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-4)
    s.reset_stats()
    s.generate(PARAMS, None, c, sp, seed=seeds)  # own layout: Q 16, 96 slots; 224 > 1.5 x 96
    assert s.stats.prefill_slots == 96 and s.compile_count == count + 2  # its prefill and decode (cache 64)
    resumed = Sampler(CFG, TOKENIZER, max_cache_len=128)
    resumed.load_layout_record(record)
    again = resumed.generate(PARAMS, None, b, sp, seed=seeds)
    assert resumed.stats.prefill_slots == 224 and [g.token_ids for g in again] == [g.token_ids for g in got]
    before = s.layout_record()
    with pytest.raises(ValueError, match="exceeds max_cache_len"):
        s.generate(PARAMS, None, c, SamplingParams(max_new_tokens=100, ignore_eos=True), seed=seeds)
    assert s.layout_record() == before  # a call that cannot run (a new layout, cache 128) records none
    off = Sampler(CFG.replace(sampler_layout_reuse=0), TOKENIZER, max_cache_len=128)
    off.load_layout_record(record)
    off.generate(PARAMS, None, b, sp, seed=seeds)
    assert off.stats.prefill_slots == 160
    for bad in (0.5, -1, True, "1.5"):
        with pytest.raises(ModelConfigError, match="sampler_layout_reuse"):
            CFG.replace(sampler_layout_reuse=bad)


@pytest.mark.parametrize("greedy", [True, False])
def test_repeated_prompts_give_the_same_generations_as_the_plain_path(greedy):
    """Rows that repeat a prompt share its prefill, not its samples: each row still draws with its
    own seed, and every row's tokens and log-probs are the plain path's."""
    rng = np.random.default_rng(3)
    system = rng.integers(3, CFG.vocab_size, size=20).tolist()
    questions = [system + rng.integers(3, CFG.vocab_size, size=24).tolist() for _ in range(2)]
    tails = [rng.integers(3, CFG.vocab_size, size=n).tolist() for n in (2, 7, 4)]
    prompts = [questions[0] + tails[0]] * 2 + [questions[1] + tails[1]] * 3 + [questions[1] + tails[2]]
    sp = SamplingParams(max_new_tokens=8, greedy=greedy, temperature=1.5, ignore_eos=True)
    shared = Sampler(CFG, TOKENIZER, max_cache_len=128)
    plain = Sampler(CFG, TOKENIZER, max_cache_len=128, share_prefix=False)
    a = shared.generate(PARAMS, None, prompts, sp, seed=11)
    b = plain.generate(PARAMS, None, prompts, sp, seed=11)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    for x, y in zip(a, b):
        np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-4)
    # 3 distinct prompts (bucket 4; remainders <= 19 -> 24 slots) after 2 group prefixes of 32, against 8 x 64
    assert shared.stats.prefill_slots == 2 * 32 + 4 * 24 and plain.stats.prefill_slots == 8 * 64
    if not greedy:  # repeats of one prompt sample on their own
        assert len({tuple(g.token_ids) for g in a[2:5]}) > 1


def test_greedy_generate_equals_uncached_forward_with_and_without_adapter(sampler):
    """Teacher-forced check: every greedy token is the argmax of the full (uncached) forward over
    prompt + generated prefix, and its log-prob is that forward's log-softmax."""
    for ad in (None, _lora(11)):
        gens = sampler.generate(PARAMS, ad, PROMPTS, SamplingParams(max_new_tokens=6, greedy=True, ignore_eos=True))
        for prompt, g in zip(PROMPTS, gens):
            ref_lp = np.asarray(
                jax.nn.log_softmax(forward(CFG, PARAMS, jnp.asarray([prompt + g.token_ids]), ad)[0], -1)
            )
            rows = ref_lp[len(prompt) - 1 : len(prompt) - 1 + len(g.token_ids)]
            assert g.token_ids == rows.argmax(-1).tolist()
            np.testing.assert_allclose(g.logprobs, rows[np.arange(6), g.token_ids], atol=1e-4)
            assert g.finish_reason == "length" and isinstance(g, Generation)


# --------------------------------------------------------------------------- padding / batching
@pytest.mark.parametrize("greedy", [True, False])
def test_padded_row_gives_the_tokens_it_gives_alone(sampler, greedy):
    sp = SamplingParams(max_new_tokens=12, greedy=greedy, ignore_eos=True)
    seeds = np.array([101, 202, 303])
    batch = sampler.generate(PARAMS, None, PROMPTS, sp, seed=seeds)
    for i, prompt in enumerate(PROMPTS):
        alone = sampler.generate(PARAMS, None, [prompt], sp, seed=seeds[i : i + 1])[0]
        assert batch[i].token_ids == alone.token_ids
        np.testing.assert_allclose(batch[i].logprobs, alone.logprobs, atol=1e-5)


def test_batches_larger_than_the_largest_bucket_are_split(sampler):
    small = Sampler(CFG, TOKENIZER, max_cache_len=64, batch_buckets=(1, 2))
    sp = SamplingParams(max_new_tokens=4, temperature=0.7, ignore_eos=True)
    gens = small.generate(PARAMS, None, PROMPTS, sp, seed=5)
    whole = sampler.generate(PARAMS, None, PROMPTS, sp, seed=5)
    assert [g.token_ids for g in gens] == [g.token_ids for g in whole]


# --------------------------------------------------------------------------- stops
def test_max_new_tokens_and_length_reason(sampler):
    for n in (1, 3, 16):
        for g in sampler.generate(PARAMS, None, PROMPTS, SamplingParams(max_new_tokens=n, ignore_eos=True)):
            assert len(g.token_ids) == len(g.logprobs) == n and g.finish_reason == "length"


def test_eos_at_any_position(sampler):
    prompt = PROMPTS[1]
    free = sampler.generate(PARAMS, None, [prompt], SamplingParams(max_new_tokens=16, greedy=True, ignore_eos=True))[0]
    seq = free.token_ids
    for k in range(len(seq)):
        first = seq.index(seq[k])
        g = sampler.generate(
            PARAMS, None, [prompt, PROMPTS[0]], SamplingParams(max_new_tokens=16, greedy=True, eos_ids=(seq[k],))
        )[0]
        assert g.token_ids == seq[: first + 1] and g.finish_reason == "stop"
        assert g.text == TOKENIZER.decode(seq[:first])  # EOS removed from the text only


def _first_stop_index(seq, stop):
    """Reference: index of the token whose decoded prefix first contains `stop`."""
    for j in range(len(seq)):
        if stop in TOKENIZER.decode(seq[: j + 1]):
            return j
    return None


def test_multi_token_stop_strings_at_any_position(sampler):
    prompt = PROMPTS[0]
    seq = sampler.generate(PARAMS, None, [prompt], SamplingParams(max_new_tokens=24, greedy=True, ignore_eos=True))[
        0
    ].token_ids
    text = TOKENIZER.decode(seq)
    assert len(text) >= 8
    checked = 0
    for start in range(0, len(text) - 3, 2):
        stop = text[start : start + 3]  # usually spans 2-3 tokens
        want = _first_stop_index(seq, stop)
        g = sampler.generate(
            PARAMS,
            None,
            [prompt],
            SamplingParams(max_new_tokens=24, greedy=True, ignore_eos=True, stop_strings=("never-there", stop)),
        )[0]
        assert g.token_ids == seq[: want + 1], (stop, want)
        assert g.finish_reason == "stop" and stop in g.text
        checked += 1
    assert checked >= 3


def test_stop_window_finds_finish_split_over_tokens():
    finish_ids = TOKENIZER.encode("ab[FINISH]c")
    assert len(finish_ids) >= 6  # "[FINISH]" is several tokens
    tables = stops.StopTables(
        *map(jnp.asarray, stops.build_token_table(stops.token_bytes(TOKENIZER, CFG.vocab_size))),
        *map(jnp.asarray, stops.build_stop_arrays(("[FINISH]", "zz"))),
    )
    hist = stops.init_history(1, tables)
    hits = []
    for t in finish_ids:
        hist, hit = stops.update_and_match(hist, jnp.asarray([t]), tables)
        hits.append(bool(hit[0]))
    end = [i for i in range(len(finish_ids)) if "[FINISH]" in TOKENIZER.decode(finish_ids[: i + 1])][0]
    assert hits == [i == end for i in range(len(finish_ids))]


def test_token_bytes_match_the_tokenizer_for_smollm2_style_byte_level():
    table = stops.token_bytes(TOKENIZER, CFG.vocab_size + 3)
    for i in range(3, len(TOKENIZER)):
        assert table[i].decode() == TOKENIZER.decode([i]), i
    assert table[-1] == b""  # padded embedding rows decode to nothing


# --------------------------------------------------------------------------- seeds
def test_determinism_per_seed(sampler):
    sp = SamplingParams(max_new_tokens=10, temperature=1.0, ignore_eos=True)
    a = sampler.generate(PARAMS, None, PROMPTS, sp, seed=1)
    b = sampler.generate(PARAMS, None, PROMPTS, sp, seed=1)
    c = sampler.generate(PARAMS, None, PROMPTS, sp, seed=2)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.logprobs for g in a] == [g.logprobs for g in b]
    assert [g.token_ids for g in a] != [g.token_ids for g in c]
    # Rows of one call get different streams even for identical prompts.
    same = sampler.generate(PARAMS, None, [PROMPTS[0]] * 4, sp, seed=1)
    assert len({tuple(g.token_ids) for g in same}) > 1


def test_sampled_logprobs_are_the_tempered_filtered_distribution(sampler):
    prompt = PROMPTS[1]
    sp = SamplingParams(max_new_tokens=5, temperature=0.7, top_k=20, top_p=0.9, ignore_eos=True)
    g = sampler.generate(PARAMS, None, [prompt], sp, seed=3)[0]
    logits = np.asarray(forward(CFG, PARAMS, jnp.asarray([prompt + g.token_ids]))[0], np.float64)
    for i, tok in enumerate(g.token_ids):
        x = logits[len(prompt) - 1 + i] / 0.7
        order = np.argsort(-x)[:20]
        p = np.exp(x[order] - x[order].max())
        p /= p.sum()
        keep = (np.cumsum(p) - p) < 0.9
        q = p * keep / (p * keep).sum()
        assert tok in order[keep]
        np.testing.assert_allclose(g.logprobs[i], np.log(q[list(order).index(tok)]), atol=1e-4)


# --------------------------------------------------------------------------- sampling ops
def _draw(logits_v, mode, n=20000, temperature=1.0, top_p=1.0, seed=0):
    logits = jnp.broadcast_to(jnp.asarray(logits_v, jnp.float32), (n, len(logits_v)))
    u = jax.random.uniform(jax.random.key(seed), (n,))
    fn = jax.jit(lambda lg, uu: ops.sample_tokens(lg, uu, mode, temperature, top_p))
    tok, lp = fn(logits, u)
    return np.asarray(tok), np.asarray(lp)


def _expected(logits_v, temperature=1.0, top_k=0, top_p=1.0):
    x = np.asarray(logits_v, np.float64) / temperature
    p = np.exp(x - x.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = np.zeros_like(p, bool)
    keep[order[: top_k or len(p)]] = True
    q = np.where(keep, p, 0)
    q /= q.sum()
    cum = np.cumsum(q[order]) - q[order]
    keep_p = np.zeros_like(p, bool)
    keep_p[order[cum < top_p]] = True
    keep_p[order[0]] = True
    q = np.where(keep_p, q, 0)
    return q / q.sum()


@pytest.mark.parametrize(
    "top_k,top_p,temperature", [(0, 1.0, 1.0), (0, 1.0, 0.5), (3, 1.0, 1.0), (0, 0.75, 1.0), (4, 0.8, 2.0)]
)
def test_sampling_ops_match_the_filtered_distribution(top_k, top_p, temperature):
    logits = [2.0, 1.5, 1.0, 0.5, 0.0, -1.0, 3.0, 0.2]
    mode = ops.SamplingMode(greedy=False, top_k=top_k, use_top_p=top_p < 1.0)
    tok, lp = _draw(logits, mode, temperature=temperature, top_p=top_p)
    q = _expected(logits, temperature, top_k, top_p)
    freq = np.bincount(tok, minlength=len(logits)) / len(tok)
    assert np.all(freq[q == 0] == 0), "sampled a filtered-out token"
    np.testing.assert_allclose(freq, q, atol=0.015)
    np.testing.assert_allclose(lp, np.log(q[tok]), atol=1e-5)


def test_full_vocab_two_level_inverse_cdf_is_unbiased():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=700) * 2  # > 2 blocks of 256, ragged tail
    logits[[5, 300, 699]] += 6
    tok, lp = _draw(logits, ops.SamplingMode(False, 0, False), n=40000)
    q = _expected(logits)
    freq = np.bincount(tok, minlength=len(logits)) / len(tok)
    for i in (5, 300, 699):
        assert abs(freq[i] - q[i]) < 0.015
    assert abs(freq.sum() - 1) < 1e-9 and tok.max() < 700
    np.testing.assert_allclose(lp, np.log(q[tok]), atol=1e-4)


def test_greedy_op_is_argmax_with_model_logprob():
    logits = jnp.asarray([[0.0, 3.0, 1.0], [5.0, -1.0, 5.5]])
    tok, lp = ops.sample_tokens(logits, jnp.zeros(2), ops.SamplingMode(True, 0, False), 1.0, 1.0)
    assert tok.tolist() == [1, 2]
    np.testing.assert_allclose(lp, jax.nn.log_softmax(logits)[jnp.arange(2), tok], atol=1e-6)


# --------------------------------------------------------------------------- compilation
def test_length_buckets_are_powers_of_two_and_three_quarter_steps():
    from rema_jax.sampling.bucketing import length_bucket, next_pow2

    ladder = sorted({length_bucket(n, 16) for n in range(1, 2049)})
    assert ladder == [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048]
    for n in range(1, 2049):
        b = length_bucket(n, 16)
        assert max(n, 16) <= b <= next_pow2(n, 16)
        assert b == 16 or 3 * (b - n) <= b  # at most a third of the bucket is padding


def test_no_recompilation_across_adapters_and_calls_within_a_bucket():
    s = Sampler(CFG, TOKENIZER, max_cache_len=128)
    mta, ra = _lora(21), _lora(31)
    sp = SamplingParams(max_new_tokens=10, temperature=1.0, ignore_eos=True)
    a = s.generate(PARAMS, mta, PROMPTS, sp, seed=0)
    count = s.compile_count
    assert count == 3  # fuse, prefill, decode
    b = s.generate(PARAMS, ra, PROMPTS, sp, seed=0)  # other agent, same structure
    assert [g.token_ids for g in a] != [g.token_ids for g in b]  # the adapter is really used
    s.generate(PARAMS, mta, [[3] * 20, [4] * 24, [5] * 18], sp, seed=9)  # other lengths, same buckets
    s.generate(
        PARAMS, ra, PROMPTS[:3], SamplingParams(max_new_tokens=13, temperature=0.5, top_p=1.0, ignore_eos=True), seed=1
    )
    s.generate(PARAMS, mta, PROMPTS, SamplingParams(max_new_tokens=16, temperature=1.3, stop_strings=("xy",)), seed=2)
    assert s.compile_count == count + 1  # only the stop-string decode variant is new
    s.generate(
        PARAMS, ra, PROMPTS, SamplingParams(max_new_tokens=12, temperature=0.9, stop_strings=("[FINISH]",)), seed=3
    )
    assert s.compile_count == count + 1


def test_stats_count_tokens_and_kernel_time():
    s = Sampler(CFG, TOKENIZER, max_cache_len=128)
    sp = SamplingParams(max_new_tokens=6, temperature=1.0, ignore_eos=True)
    adapter = _lora(21)
    gens = s.generate(PARAMS, adapter, PROMPTS, sp, seed=0)
    st = s.stats
    assert st.calls == 1 and st.new_tokens == sum(len(g.token_ids) for g in gens) == 6 * len(PROMPTS)
    assert st.prompt_tokens == sum(len(p) for p in PROMPTS) <= st.prefill_slots
    assert st.prefill_s > 0 and st.decode_s > 0 and st.fuse_s > 0 and st.compile_s > 0
    assert st.kernel_s == st.prefill_s + st.decode_s + st.fuse_s
    old = s.reset_stats()
    assert old is st and s.stats.calls == 0 and s.stats.kernel_s == 0
    s.generate(PARAMS, adapter, PROMPTS, sp, seed=1)  # same arrays: fused weights reused, no compile
    assert s.stats.calls == 1 and s.stats.fuse_s == 0 and s.stats.compile_s == 0


def test_bad_inputs_raise_clear_errors(sampler):
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(ValueError, match="stop_strings"):
        SamplingParams(max_new_tokens=3, stop_strings="[FINISH]")
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(max_new_tokens=3, top_p=0.0)
    with pytest.raises(ValueError, match="outside"):
        sampler.generate(PARAMS, None, [[1, CFG.vocab_size]], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="empty"):
        sampler.generate(PARAMS, None, [[]], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="max_cache_len"):
        sampler.generate(PARAMS, None, [[3] * 100], SamplingParams(max_new_tokens=200))
    with pytest.raises(ValueError, match="per-row seeds"):
        sampler.generate(PARAMS, None, PROMPTS, SamplingParams(max_new_tokens=2), seed=np.arange(2))


@pytest.mark.parametrize("cache_size, expected", [(1, [0, 0, 0]), (2, [0, 1, 1])])
def test_a_full_fused_cache_evicts_before_fusing_the_next_agent(cache_size, expected):
    """At an agent switch the copy being replaced is gone before the new one is computed, so the
    peak holds at most ``fused_cache_size`` base-sized copies (not one more)."""
    sampler = Sampler(CFG, TOKENIZER, max_cache_len=64, fused_cache_size=cache_size)
    cached_at_fuse = []
    compiled = sampler._compiled

    def recording(key, *args):
        exe = compiled(key, *args)
        if key[0] != "fuse":
            return exe
        return lambda *a: (cached_at_fuse.append(len(sampler._fused)), exe(*a))[1]

    sampler._compiled = recording
    agents = [_lora(10 * i) for i in range(3)]
    fused = [sampler._fused_params(PARAMS, a, 8) for a in agents]
    assert cached_at_fuse == expected
    assert sampler._fused_params(PARAMS, agents[2], 8) is fused[2]  # the newest copy is reused, not refused
    assert len(sampler._fused) == cache_size


def test_column_blocks_policy_and_the_same_generations():
    """Auto column blocks: 2 from batch bucket 4 up on this one-device CPU, 1 below (reusing any
    cached copy); a fixed `sampler_column_blocks` always. Blocks change no token nor log-prob."""
    sampler = Sampler(CFG, TOKENIZER, max_cache_len=64)
    assert jax.default_backend() == "cpu" and jax.device_count() == 1
    assert sampler.column_blocks(3) == (2, False) and sampler.column_blocks(32) == (2, False)
    assert sampler.column_blocks(1) == (1, True) and sampler.column_blocks(2) == (1, True)
    fixed = Sampler(CFG.replace(sampler_column_blocks=3), TOKENIZER, max_cache_len=64)
    assert fixed.column_blocks(1) == (3, False) and fixed.column_blocks(32) == (3, False)
    with pytest.raises(ModelConfigError, match="sampler_column_blocks"):
        CFG.replace(sampler_column_blocks=-1)
    with pytest.raises(ValueError, match="column_blocks"):
        kernel.fuse_params(CFG, PARAMS, None, 0)

    prompts = PROMPTS + [[30, 31, 32]]  # batch bucket 4: two blocks under auto
    sp = SamplingParams(max_new_tokens=6, temperature=1.0, ignore_eos=True)
    one = Sampler(CFG.replace(sampler_column_blocks=1), TOKENIZER, max_cache_len=64).generate(
        PARAMS, None, prompts, sp, seed=5
    )
    two = sampler.generate(PARAMS, None, prompts, sp, seed=5)
    assert sampler._fused[0][1] == 2 and len(sampler._fused[0][2].lm_head_hv) == 2
    assert [g.token_ids for g in two] == [g.token_ids for g in one]
    np.testing.assert_allclose([g.logprobs for g in two], [g.logprobs for g in one], atol=1e-5)
    sampler.generate(PARAMS, None, prompts[:1], sp, seed=5)  # a one-row call reuses the 2-block copy
    assert len(sampler._fused) == 1 and sampler._fused[0][1] == 2
    assert [k[-1] for k in sampler.program_keys() if k[0] == "fuse"] == [2]
    small = Sampler(CFG, TOKENIZER, max_cache_len=64)
    small.generate(PARAMS, None, prompts[:1], sp, seed=5)  # fused with 1 block ...
    small.generate(PARAMS, None, prompts, sp, seed=5)  # ... then fused again with 2 for 4 rows,
    assert [f[1] for f in small._fused] == [2]  # and the stale 1-block copy is gone


def test_dropped_programs_compile_again_and_give_the_same_tokens():
    sampler = Sampler(CFG, TOKENIZER, max_cache_len=64)
    sp = SamplingParams(max_new_tokens=5, temperature=1.0)
    first = sampler.generate(PARAMS, None, PROMPTS[:2], sp, seed=3)
    held, compiled = sampler.program_keys(), sampler.compile_count
    assert held and sampler.drop_programs(keep=held) == 0
    assert sampler.drop_programs() == len(held) and sampler.program_keys() == frozenset()
    sampler.release_fused()  # else the cached fused weights spare the fuse program
    again = sampler.generate(PARAMS, None, PROMPTS[:2], sp, seed=3)
    assert sampler.compile_count == compiled + len(held) and sampler.program_keys() == held
    assert [g.token_ids for g in again] == [g.token_ids for g in first]


# --------------------------------------------------------------------------- decode compaction
def test_compact_target_policy():
    """Unfinished rows continue in the largest batch bucket <= half the batch, not below the configured
    least batch; 0 = off; None (the default) = 4 on CPU."""
    buckets = (1, 2, 4, 8, 16, 32, 48, 64)
    s = Sampler(CFG.replace(sampler_compact_min_batch=4), TOKENIZER, max_cache_len=64, batch_buckets=buckets)
    assert [s.compact_target(b) for b in (1, 2, 4, 8, 16, 32, 48, 64)] == [0, 0, 0, 4, 8, 16, 16, 32]
    one = Sampler(CFG.replace(sampler_compact_min_batch=1), TOKENIZER, max_cache_len=64, batch_buckets=buckets)
    assert [one.compact_target(b) for b in (1, 2, 4, 8)] == [0, 1, 2, 4]
    off = Sampler(CFG.replace(sampler_compact_min_batch=0), TOKENIZER, max_cache_len=64, batch_buckets=buckets)
    assert all(off.compact_target(b) == 0 for b in buckets)
    auto = Sampler(CFG, TOKENIZER, max_cache_len=64, batch_buckets=buckets)  # None: 4 on CPU
    assert CFG.sampler_compact_min_batch is None and jax.default_backend() == "cpu"
    assert [auto.compact_target(b) for b in buckets] == [s.compact_target(b) for b in buckets]
    for bad in (-1, 2.0, True):
        with pytest.raises(ModelConfigError, match="sampler_compact_min_batch"):
            CFG.replace(sampler_compact_min_batch=bad)


# Prompts whose rows finish at many different steps (EOS ids that the tiny model samples now and then).
COMPACT_PROMPTS = [[5 + i, 6, 7, 8 + i] * (1 + i % 3) for i in range(13)]
COMPACT_SAMPLING = {
    "sampled": SamplingParams(max_new_tokens=30, temperature=1.0, eos_ids=(3, 9, 17)),
    "greedy": SamplingParams(max_new_tokens=30, greedy=True, eos_ids=(85, 12, 64)),
    "stop string": SamplingParams(max_new_tokens=30, temperature=1.0, stop_strings=("a",)),
    "top-p": SamplingParams(max_new_tokens=30, temperature=0.8, top_p=0.9, eos_ids=(3, 9, 17)),
}


@pytest.mark.parametrize("case", sorted(COMPACT_SAMPLING))
def test_compaction_gives_the_same_generations_with_fewer_row_steps(case):
    """Continuing the unfinished rows in smaller batches changes no token, log-prob nor finish reason
    (each row samples with its own key), and the decode computes fewer rows x steps."""
    sp, adapter = COMPACT_SAMPLING[case], _lora(3)
    runs = {}
    for least in (0, 1):
        s = Sampler(CFG.replace(sampler_compact_min_batch=least), TOKENIZER, max_cache_len=128)
        runs[least] = (s.generate(PARAMS, adapter, COMPACT_PROMPTS, sp, seed=11), s.stats)
    (plain, plain_stats), (compact, stats) = runs[0], runs[1]
    lengths = [len(g.token_ids) for g in plain]
    assert len(set(lengths)) > 3 and max(lengths) == 30  # rows finish at many different steps
    assert [g.token_ids for g in compact] == [g.token_ids for g in plain]
    assert [g.finish_reason for g in compact] == [g.finish_reason for g in plain]
    assert [g.text for g in compact] == [g.text for g in plain]
    np.testing.assert_allclose(
        np.concatenate([g.logprobs for g in compact]), np.concatenate([g.logprobs for g in plain]), atol=1e-5
    )
    assert plain_stats.compactions == 0 and plain_stats.decode_row_steps == 16 * (max(lengths) - 1)
    assert stats.compactions >= 1 and stats.decode_row_steps < plain_stats.decode_row_steps
    assert stats.new_tokens == plain_stats.new_tokens == sum(lengths)


def test_compaction_programs_compile_once_and_rows_of_a_split_batch_keep_their_order():
    """A second call of the same shapes compiles nothing (the continuation programs are cached by
    batch sizes, not by which rows survive); filler slots of a compacted batch are never returned."""
    s = Sampler(CFG.replace(sampler_compact_min_batch=1), TOKENIZER, max_cache_len=128)
    sp = COMPACT_SAMPLING["sampled"]
    first = s.generate(PARAMS, None, COMPACT_PROMPTS, sp, seed=1)
    compiled = s.compile_count
    assert any(k[0] == "decode_resume" for k in s.program_keys())
    again = s.generate(PARAMS, None, COMPACT_PROMPTS[::-1], sp, seed=1)  # other rows survive
    assert s.compile_count == compiled
    alone = [s.generate(PARAMS, None, [p], sp, seed=np.array([i]))[0] for i, p in enumerate(COMPACT_PROMPTS[:3])]
    per_row = s.generate(PARAMS, None, COMPACT_PROMPTS[:3], sp, seed=np.arange(3))
    assert [g.token_ids for g in per_row] == [g.token_ids for g in alone]
    assert len(first) == len(again) == len(COMPACT_PROMPTS)
