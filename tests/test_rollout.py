"""ReMA rollouts: prompts, chat splicing, the multi-turn state machine and RoleSequences.

The policy is scripted (no model): each call answers the live rows from a script, so every finish
reason and layout rule is checked exactly. The tokenizer is a tiny byte-level BPE trained in-test
with a ChatML template (no network); one test repeats the splicing check on SmolLM2's tokenizer.
"""

import functools
import re

import numpy as np
import pytest

from rema_jax import rollout as R
from rema_jax.models.testing import chatml_bpe_tokenizer
from rema_jax.rollout import prompts as P
from rema_jax.sampling import Generation


def _tokenizer():
    return chatml_bpe_tokenizer("Solve (3t^2+5t+a)(4t^2+bt-2) = 12t^4+26t^3-8t^2-16t+6; find a+b. [FINISH] \\boxed{-1}")


@pytest.fixture
def tok():
    return _tokenizer()


@pytest.fixture
def enc(tok):
    return R.ChatEncoder(tok)


class ScriptedPolicy:
    """Answers call k of a role with ``script[role][k]``: one ``(text, how)`` per live row.

    ``how``: "eos" (text + sampled EOS), "stop" (text must end with [FINISH], no EOS), "length"
    (text cut to max_new_tokens). Every sampled token gets a distinct log-prob so alignment is
    checkable.
    """

    def __init__(self, tok, script):
        self.tok, self.script = tok, {k: list(v) for k, v in script.items()}
        self.calls = []  # (role, prompts, sampling)
        self._next_lp = 0

    def __call__(self, role, prompts, sampling):
        k = sum(1 for c in self.calls if c[0] == role)
        self.calls.append((role, [list(p) for p in prompts], sampling))
        rows = self.script[role][k]
        assert len(rows) == len(prompts), f"{role} call {k}: {len(prompts)} prompts, script {len(rows)}"
        out = []
        for text, how in rows:
            ids = self.tok(text, add_special_tokens=False)["input_ids"]
            if how == "eos":
                ids, reason = ids + [self.tok.eos_token_id], "stop"
            elif how == "stop":
                assert text.endswith(P.FINISH_FLAG) and P.FINISH_FLAG in sampling.stop_strings
                reason = "stop"
            else:
                assert how == "length"
                ids, reason = ids[: sampling.max_new_tokens], "length"
                text = self.tok.decode(ids)
            lps = [-(self._next_lp + j + 1) / 1000.0 for j in range(len(ids))]
            self._next_lp += len(ids)
            out.append(Generation(list(ids), lps, reason, text))
        return out

    def role_calls(self, role):
        return [c for c in self.calls if c[0] == role]


def _cfg(**kw):
    kw.setdefault("mode", "multi_turn")
    kw.setdefault("max_new_tokens", 64)
    kw.setdefault("max_prompt_len", 2048)
    return R.RolloutConfig(**kw)


def _chat_ids(tok, msgs, gen_prompt=True):
    """Reference: the chat rendered as text and tokenized whole (valid when texts tokenize alone)."""
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen_prompt)
    return tok(text, add_special_tokens=False)["input_ids"]


Q = "Solve (3t^2+5t+a)(4t^2+bt-2) = 12t^4+26t^3-8t^2-16t+6; find a+b."
M1, R1 = "Expand and compare coefficients.", "a = -3 and b = 2."
M2, R2 = "Check it, then answer. [FINISH]", "So a+b = \\boxed{-1}. [FINISH]"


# ----------------------------------------------------------------------------------- prompts


def test_prompt_defaults_and_code_quirks():
    assert R.get_prompts("single_turn")[P.META_THINKING].system == P.PAPER_MAMRP_HIGH_SYSTEM
    mt = R.get_prompts("multi_turn")
    assert mt.finish_flag == "[FINISH]" and mt[P.META_THINKING].system == P.CODE_MT_MTA_SYSTEM
    assert mt[P.REASONING].user({"question": "x"}, "m") == "Question:\nx\n\nInstruction:\nm"
    assert R.get_prompts("single_turn", "paper").finish_flag is None
    code_st = R.get_prompts("single_turn", "code")
    assert "\\boxed{{}}" in code_st[P.REASONING].system  # literal double braces, as in the repo
    assert code_st[P.META_THINKING].system.split("\n")[0].endswith("step-by-step. ")
    assert P.PAPER_MAMRP_HIGH_SYSTEM.split("\n")[0].endswith("step-by-step.")
    assert code_st[P.META_THINKING].user({"question": "raw q"}) == "raw q"
    assert R.get_prompts("vrp")[P.SINGLE].user({"question": "q"}) == "Here is the question:\nq"
    assert "\\boxed{}" in R.get_prompts("mrp")[P.SINGLE].system
    judge = R.get_prompts("single_turn", task="judge")
    ra_user = judge[P.REASONING].user(P.judge_fields("Q?", "resp a", "resp b"), "the plan")
    assert "resp a" in ra_user and "resp b" in ra_user and "the plan" in ra_user
    assert "[[A]]" in judge[P.REASONING].system


def test_prompt_errors():
    with pytest.raises(ValueError, match="unknown rollout mode"):
        R.get_prompts("tree")
    with pytest.raises(ValueError, match="no judge prompts"):
        R.get_prompts("multi_turn", task="judge")
    with pytest.raises(ValueError, match="needs the meta-thinking agent's instruction"):
        R.get_prompts("multi_turn")[P.REASONING].user({"question": "q"})
    with pytest.raises(ValueError, match="missing fields"):
        R.get_prompts("single_turn", task="judge")[P.REASONING].user({"question": "q"}, "m")
    with pytest.raises(ValueError, match="max_turns"):
        _cfg(max_turns=0)


# -------------------------------------------------------------------------------- chat splice


def test_splice_matches_whole_text_tokenization(tok, enc):
    a1 = tok(M1, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]  # stopped on EOS
    msgs = [
        R.TextMessage("system", "S"),
        R.TextMessage("user", Q),
        R.GeneratedMessage(tuple(a1), stopped=True),
        R.TextMessage("user", R1),
    ]
    out = enc.encode(msgs, add_generation_prompt=True)
    ref = _chat_ids(
        tok,
        [
            {"role": "system", "content": "S"},
            {"role": "user", "content": Q},
            {"role": "assistant", "content": M1},
            {"role": "user", "content": R1},
        ],
    )
    assert out.token_ids == ref  # the sampled EOS replaces the template's <|im_end|>
    ((s, e),) = out.generated_spans
    assert out.token_ids[s:e] == a1 and out.eos_label_positions == [None]


def test_splice_keeps_non_canonical_ids_and_labels_eos_after_stop_string(tok, enc):
    # A sampled split that tokenizing the text would never produce: must survive untouched.
    odd = [tok.convert_tokens_to_ids(c) for c in "plan"] + tok("[FINISH]", add_special_tokens=False)["input_ids"]
    assert tok(tok.decode(odd), add_special_tokens=False)["input_ids"] != odd
    msgs = [R.TextMessage("system", "S"), R.TextMessage("user", "q"), R.GeneratedMessage(tuple(odd), stopped=True)]
    full = enc.encode(msgs, add_generation_prompt=False)
    ((s, e),) = full.generated_spans
    assert full.token_ids[s:e] == odd
    assert full.eos_label_positions == [e] and full.token_ids[e] == tok.eos_token_id
    assert len(full.token_ids) == e + 1  # trailing template tokens are cut
    # Truncated turn: no label, template's own <|im_end|> still closes the turn in later prompts.
    trunc = enc.encode(
        msgs[:2] + [R.GeneratedMessage(tuple(odd), stopped=False), R.TextMessage("user", "more")],
        add_generation_prompt=True,
    )
    assert trunc.eos_label_positions == [None] and trunc.token_ids[e] == tok.eos_token_id
    prompt = enc.encode(msgs[:2], add_generation_prompt=True).token_ids
    assert trunc.token_ids[: len(prompt) + len(odd)] == prompt + odd  # prefix-stable


def test_encoder_rejects_sentinel_and_missing_template(tok):
    enc = R.ChatEncoder(tok)
    with pytest.raises(ValueError, match="sentinel"):
        enc.encode([R.TextMessage("user", "\u2063REMA-GENERATED-TURN-0\u2063")], add_generation_prompt=True)

    class NoTemplate:
        chat_template = None

    with pytest.raises(ValueError, match="no chat_template"):
        R.ChatEncoder(NoTemplate())


# ------------------------------------------------------------------------- multi-turn machine


def _finished_script():
    return {P.META_THINKING: [[(M1, "eos")], [(M2, "stop")]], P.REASONING: [[(R1, "eos")], [(R2, "stop")]]}


def test_multi_turn_finished_texts_and_views(tok, enc):
    pol = ScriptedPolicy(tok, _finished_script())
    cfg = _cfg()
    (tr,) = R.run_rollout(pol, enc, [Q], cfg)
    assert tr.finish_reason == R.FINISHED and tr.num_turns == 2
    assert [t.role for t in tr.turns] == [P.META_THINKING, P.REASONING] * 2
    assert tr.turns[2].text == M2  # [FINISH] kept in the MTA message
    assert tr.turns[3].text == "So a+b = \\boxed{-1}."  # stripped + rstripped
    assert tr.final_answer == "So a+b = \\boxed{-1}."
    assert P.FINISH_FLAG in tok.decode(tr.turns[3].token_ids)  # ids keep what was sampled
    for _, _, sp in pol.calls:
        assert sp.stop_strings == ("[FINISH]",) and sp.max_new_tokens == 64

    ps = cfg.prompts
    mta_sys, ra_sys = ps[P.META_THINKING].system, ps[P.REASONING].system
    # MTA, round 2: [system, user=q, assistant=m1, user=r1] + generation prompt.
    mta2 = pol.role_calls(P.META_THINKING)[1][1][0]
    assert mta2 == _chat_ids(
        tok,
        [
            {"role": "system", "content": mta_sys},
            {"role": "user", "content": Q},
            {"role": "assistant", "content": M1},
            {"role": "user", "content": R1},
        ],
    )
    # RA, round 1: [system, user="Question:\n{q}\n\nInstruction:\n{m1}"].
    ra_first_user = f"Question:\n{Q}\n\nInstruction:\n{M1}"
    ra1 = pol.role_calls(P.REASONING)[0][1][0]
    assert ra1 == _chat_ids(tok, [{"role": "system", "content": ra_sys}, {"role": "user", "content": ra_first_user}])
    # RA, round 2: + (assistant=r1, user=m2 raw, with its [FINISH]).
    ra2 = pol.role_calls(P.REASONING)[1][1][0]
    assert ra2 == _chat_ids(
        tok,
        [
            {"role": "system", "content": ra_sys},
            {"role": "user", "content": ra_first_user},
            {"role": "assistant", "content": R1},
            {"role": "user", "content": M2},
        ],
    )
    assert tr.turns[2].prompt_len == len(mta2) and tr.turns[3].prompt_len == len(ra2)


def test_ra_finish_flag_alone_does_not_end(tok, enc):
    # Only an MTA [FINISH] ends the trajectory; the RA's own [FINISH] is just stripped.
    script = {
        P.META_THINKING: [[(M1, "eos")], [(M1, "eos")]],
        P.REASONING: [[("done [FINISH]", "stop")], [(R1, "eos")]],
    }
    (tr,) = R.run_rollout(ScriptedPolicy(tok, script), enc, [Q], _cfg(max_turns=2))
    assert tr.turns[1].text == "done" and tr.finish_reason == R.OUT_OF_TURNS
    assert tr.num_turns == 2


def test_out_of_turns(tok, enc):
    script = {P.META_THINKING: [[(M1, "eos")]] * 3, P.REASONING: [[(R1, "eos")]] * 3}
    pol = ScriptedPolicy(tok, script)
    (tr,) = R.run_rollout(pol, enc, [Q], _cfg(max_turns=3))
    assert tr.finish_reason == R.OUT_OF_TURNS and tr.num_turns == 3 and len(pol.calls) == 6


@pytest.mark.parametrize("who", [P.META_THINKING, P.REASONING])
def test_stop_when_truncated(tok, enc, who):
    long = "word " * 40
    script = {
        P.META_THINKING: [[(long if who == P.META_THINKING else M1, "length" if who == P.META_THINKING else "eos")]],
        P.REASONING: [[(long, "length")]],
    }
    pol = ScriptedPolicy(tok, script)
    (tr,) = R.run_rollout(pol, enc, [Q], _cfg(max_new_tokens=8))
    assert tr.finish_reason == R.TRUNCATED and tr.num_turns == 1
    if who == P.META_THINKING:  # dummy empty RA message, RA never called
        assert tr.turns[1].is_dummy and tr.turns[1].text == "" and tr.final_answer == ""
        assert not pol.role_calls(P.REASONING)
    else:
        assert len(tr.turns[1].token_ids) == 8 and tr.turns[1].truncated


def test_truncated_final_answer_overrides_finished(tok, enc):
    script = {P.META_THINKING: [[(M2, "stop")]], P.REASONING: [[("x " * 30, "length")]]}
    (tr,) = R.run_rollout(ScriptedPolicy(tok, script), enc, [Q], _cfg(max_new_tokens=6))
    assert tr.finish_reason == R.TRUNCATED


def test_truncation_without_stop_when_truncated_continues(tok, enc):
    script = {P.META_THINKING: [[("y " * 30, "length")], [(M2, "stop")]], P.REASONING: [[(R1, "eos")], [(R2, "stop")]]}
    (tr,) = R.run_rollout(ScriptedPolicy(tok, script), enc, [Q], _cfg(max_new_tokens=6, stop_when_truncated=False))
    assert tr.finish_reason == R.FINISHED and tr.turns[0].truncated and tr.num_turns == 2


def test_conversation_too_long(tok, enc):
    # Measure the prompts of a finished run, then set limits that cut at each agent's 2nd turn.
    # A long m2 makes the RA's 2nd prompt the longest prompt of the run.
    long_m2 = "Check every coefficient again. " * 20 + "[FINISH]"
    script = {P.META_THINKING: [[(M1, "eos")], [(long_m2, "stop")]], P.REASONING: [[(R1, "eos")], [(R2, "stop")]]}
    (ref,) = R.run_rollout(ScriptedPolicy(tok, script), enc, [Q], _cfg(max_new_tokens=512))
    lens = [t.prompt_len for t in ref.turns]
    assert lens[3] > max(lens[:3])

    # RA's 2nd prompt too long: dummy RA message appended after m2.
    pol = ScriptedPolicy(tok, script)
    (tr,) = R.run_rollout(pol, enc, [Q], _cfg(max_new_tokens=512, max_prompt_len=lens[3] - 1))
    assert tr.finish_reason == R.CONVERSATION_TOO_LONG and tr.num_turns == 2
    assert [t.role for t in tr.turns] == [P.META_THINKING, P.REASONING] * 2
    assert tr.turns[3].is_dummy and tr.final_answer == ""
    assert len(pol.role_calls(P.REASONING)) == 1
    # The limit is inclusive: a prompt of exactly max_prompt_len is fed.
    (tr,) = R.run_rollout(ScriptedPolicy(tok, script), enc, [Q], _cfg(max_new_tokens=512, max_prompt_len=lens[3]))
    assert tr.finish_reason == R.FINISHED

    # Very first MTA prompt too long: a configuration error.
    with pytest.raises(RuntimeError, match="first meta_thinking prompt"):
        R.run_rollout(
            ScriptedPolicy(tok, _finished_script()), enc, [Q], _cfg(max_prompt_len=ref.turns[0].prompt_len - 1)
        )


def test_mta_too_long_on_later_turn(tok, enc):
    # A long r1 makes the MTA's 2nd prompt exceed the limit while the RA's 1st prompt fits.
    long_r1 = "step " * 200
    script = {P.META_THINKING: [[(M1, "eos")]], P.REASONING: [[(long_r1, "eos")]]}
    pol = ScriptedPolicy(tok, script)
    (ref,) = R.run_rollout(pol, enc, [Q], _cfg(max_turns=1))
    limit = max(ref.turns[0].prompt_len, ref.turns[1].prompt_len)  # round 1 fits, round 2 cannot
    pol = ScriptedPolicy(tok, script)
    (tr,) = R.run_rollout(pol, enc, [Q], _cfg(max_prompt_len=limit, max_new_tokens=1024))
    assert tr.finish_reason == R.CONVERSATION_TOO_LONG and len(tr.turns) == 2
    assert not tr.turns[-1].is_dummy and len(pol.calls) == 2


def test_group_replication_and_batching(tok, enc):
    # 2 questions x 3 samples, interleaved; rows finish at different rounds.
    qs = ["q zero", "q one"]
    script = {
        P.META_THINKING: [
            [(M2, "stop"), (M1, "eos"), (M1, "eos"), (M2, "stop"), (M1, "eos"), ("z " * 30, "length")],
            [(M2, "stop"), (M1, "eos"), (M1, "eos")],
        ],
        P.REASONING: [
            [(R2, "stop"), (R1, "eos"), (R1, "eos"), (R2, "stop"), (R1, "eos")],
            [(R2, "stop"), (R1, "eos"), (R1, "eos")],
        ],
    }
    pol = ScriptedPolicy(tok, script)
    trs = R.run_rollout(pol, enc, qs, _cfg(num_samples=3, max_turns=2, max_new_tokens=8))
    assert [(t.question_index, t.sample_index) for t in trs] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert [t.finish_reason for t in trs] == [
        R.FINISHED,
        R.FINISHED,
        R.OUT_OF_TURNS,
        R.FINISHED,
        R.OUT_OF_TURNS,
        R.TRUNCATED,
    ]
    assert [len(c[1]) for c in pol.calls] == [6, 5, 3, 3]  # one call per role per round, live rows
    assert [c[0] for c in pol.calls] == [P.META_THINKING, P.REASONING] * 2
    for tr in trs:  # the question is in every MTA prompt of its own trajectory
        assert qs[tr.question_index] in tok.decode(
            enc.encode(R.role_view(tr, P.META_THINKING, _cfg().prompts, upto=0), add_generation_prompt=True).token_ids
        )
    mta_prompts = pol.role_calls(P.META_THINKING)[0][1]
    assert mta_prompts[0] == mta_prompts[1] == mta_prompts[2] != mta_prompts[3]


# ----------------------------------------------------------------------------- RoleSequences


def _check_rows(seqs, trs, role, tok, label_eos=True):
    n, length = seqs.tokens.shape
    assert n == len(trs) and length % 64 == 0
    assert (seqs.loss_mask[:, 0] == 0).all()
    for r, tr in enumerate(trs):
        row_len = int(seqs.attention_mask[r].sum())
        assert (seqs.attention_mask[r, :row_len] == 1).all() and (seqs.attention_mask[r, row_len:] == 0).all()
        assert (seqs.tokens[r, row_len:] == tok.pad_token_id).all()
        own = tr.turns_of(role, include_dummy=False)
        expect_ids, expect_lp, expect_turn, expect_eos = [], [], [], []
        for t in own:
            expect_ids += list(t.token_ids)
            expect_lp += list(t.logprobs)
            expect_turn += [t.turn] * len(t.token_ids)
            expect_eos += [0.0] * len(t.token_ids)
            ends_on_flag = t.stop_reason == "stop" and t.token_ids[-1] != tok.eos_token_id
            if ends_on_flag and label_eos:
                expect_ids.append(tok.eos_token_id)
                expect_lp.append(0.0)
                expect_turn.append(t.turn)
                expect_eos.append(1.0)
        m = seqs.loss_mask[r] == 1
        assert seqs.tokens[r][m].tolist() == expect_ids  # exactly the sampled ids, in order
        np.testing.assert_allclose(seqs.behaviour_logprobs[r][m], expect_lp)
        assert seqs.turn_ids[r][m].tolist() == expect_turn
        assert (seqs.turn_ids[r][~m] == -1).all() and (seqs.behaviour_logprobs[r][~m] == 0).all()
        assert seqs.eos_label_mask[r][m].tolist() == expect_eos and seqs.eos_label_mask[r][~m].sum() == 0
        assert seqs.group_ids[r] == tr.question_index and seqs.sample_ids[r] == tr.sample_index
        assert seqs.num_turns[r] == len(own)
        # Every turn's prompt is a verbatim prefix of the row (what the policy saw).
        if own:
            last = own[-1]
            assert row_len == last.prompt_len + len(last.token_ids) + (
                1 if (label_eos and last.stop_reason == "stop" and last.token_ids[-1] != tok.eos_token_id) else 0
            )


def test_role_sequences_multi_turn(tok, enc):
    cfg = _cfg(num_samples=2)
    script = {k: [[row[0]] * 2 for row in v] for k, v in _finished_script().items()}
    trs = R.run_rollout(ScriptedPolicy(tok, script), enc, [Q], cfg)
    for role in (P.META_THINKING, P.REASONING):
        seqs = R.build_role_sequences(trs, enc, cfg, role)
        _check_rows(seqs, trs, role, tok)
        assert seqs.rewards.shape == (2,) and seqs.tokens.dtype == np.int32
        assert seqs.eos_label_mask.sum() == 2  # each row: one turn stopped on [FINISH]
        # The row is the role's full chat: it decodes to the template render of its view.
        ps = cfg.prompts
        text = tok.decode(seqs.tokens[0][seqs.attention_mask[0] == 1].tolist())
        assert text.startswith(f"<|im_start|>system\n{ps[role].system}<|im_end|>\n")
    mta = R.build_role_sequences(trs, enc, cfg, P.META_THINKING)
    text = tok.decode(mta.tokens[0][mta.attention_mask[0] == 1].tolist())
    assert text.endswith(f"<|im_start|>assistant\n{M2}<|im_end|>")
    ra = R.build_role_sequences(trs, enc, cfg, P.REASONING)
    text = tok.decode(ra.tokens[0][ra.attention_mask[0] == 1].tolist())
    assert text.endswith(f"<|im_start|>user\n{M2}<|im_end|>\n<|im_start|>assistant\n{R2}<|im_end|>")


def test_role_sequences_options_and_dummy_rows(tok, enc):
    script = {P.META_THINKING: [[("w " * 30, "length"), (M2, "stop")]], P.REASONING: [[(R2, "stop")]]}
    cfg = _cfg(num_samples=2, max_new_tokens=8, label_eos_after_stop_string=False)
    trs = R.run_rollout(ScriptedPolicy(tok, script), enc, [Q], cfg)
    assert [t.finish_reason for t in trs] == [R.TRUNCATED, R.FINISHED]
    ra = R.build_role_sequences(trs, enc, cfg, P.REASONING, bucket="pow2")
    length = ra.tokens.shape[1]
    assert length & (length - 1) == 0
    assert ra.loss_mask[0].sum() == 0 and ra.num_turns.tolist() == [0, 1]  # dummy-only RA row
    assert ra.eos_label_mask.sum() == 0  # labelling switched off
    mta = R.build_role_sequences(trs, enc, cfg, P.META_THINKING, pad_to=512)
    assert mta.tokens.shape == (2, 512) and mta.loss_mask[0].sum() == 8  # truncated: no EOS label
    with pytest.raises(ValueError, match="does not fit pad_to"):
        R.build_role_sequences(trs, enc, cfg, P.META_THINKING, pad_to=16)
    with pytest.raises(ValueError, match="does not speak"):
        R.build_role_sequences(trs, enc, cfg, P.SINGLE)


def test_bucket_length():
    assert [R.bucket_length(n, "pow2") for n in (1, 2, 3, 64, 65)] == [1, 2, 4, 64, 128]
    assert [R.bucket_length(n, 64) for n in (1, 64, 65)] == [64, 64, 128]


# ----------------------------------------------------------------------------- single-turn modes


@pytest.mark.parametrize("mode", ["vrp", "mrp"])
def test_single_agent_modes(tok, enc, mode):
    script = {P.SINGLE: [[("a \\boxed{-1}", "eos"), ("b " * 30, "length")]]}
    pol = ScriptedPolicy(tok, script)
    cfg = _cfg(mode=mode, num_samples=2, max_new_tokens=8)
    trs = R.run_rollout(pol, enc, [Q], cfg)
    assert [t.finish_reason for t in trs] == [R.FINISHED, R.TRUNCATED]
    assert trs[0].final_answer == "a \\boxed{-1}" and trs[0].num_turns == 1
    ((role, prompts, sp),) = pol.calls
    assert role == P.SINGLE and sp.stop_strings == ()
    ps = cfg.prompts[P.SINGLE]
    assert prompts[0] == _chat_ids(
        tok, [{"role": "system", "content": ps.system}, {"role": "user", "content": ps.user({"question": Q})}]
    )
    _check_rows(R.build_role_sequences(trs, enc, cfg, P.SINGLE), trs, P.SINGLE, tok)


@pytest.mark.parametrize("variant", ["paper", "code"])
def test_single_turn_mamrp(tok, enc, variant):
    plan = "Expand the product. [FINISH] is just text here"
    script = {P.META_THINKING: [[(plan, "eos")]], P.REASONING: [[("\\boxed{-1} [FINISH]", "eos")]]}
    pol = ScriptedPolicy(tok, script)
    cfg = _cfg(mode="single_turn", prompt_variant=variant, max_turns=30)
    (tr,) = R.run_rollout(pol, enc, [Q], cfg)
    assert tr.finish_reason == R.FINISHED and tr.num_turns == 1 and len(pol.calls) == 2
    assert tr.final_answer == "\\boxed{-1} [FINISH]"  # no finish flag in single-turn mode
    assert all(sp.stop_strings == () for _, _, sp in pol.calls)
    ra_prompt = pol.role_calls(P.REASONING)[0][1][0]
    ra = cfg.prompts[P.REASONING]
    assert ra_prompt == _chat_ids(
        tok, [{"role": "system", "content": ra.system}, {"role": "user", "content": ra.user({"question": Q}, plan)}]
    )
    if variant == "paper":
        assert "[Provided Instruction] " + plan in tok.decode(ra_prompt)
    for role in (P.META_THINKING, P.REASONING):
        _check_rows(R.build_role_sequences([tr], enc, cfg, role), [tr], role, tok)


def test_single_turn_truncated(tok, enc):
    script = {P.META_THINKING: [[("p " * 30, "length")]], P.REASONING: [[(R1, "eos")]]}
    cfg = _cfg(mode="single_turn", max_new_tokens=5, stop_when_truncated=False)
    (tr,) = R.run_rollout(ScriptedPolicy(tok, script), enc, [Q], cfg)
    assert tr.finish_reason == R.TRUNCATED and tr.final_answer == R1


def test_policy_answer_validated(tok, enc):
    def bad(role, prompts, sampling):
        return [Generation([1, 2], [0.0], "stop", "x")] * len(prompts)

    with pytest.raises(ValueError, match="2 token ids but 1 logprobs"):
        R.run_rollout(bad, enc, [Q], _cfg())
    with pytest.raises(ValueError, match="1 generations for 2"):
        R.run_rollout(lambda r, p, s: [Generation([1], [0.0], "stop", "x")], enc, [Q, Q], _cfg())


def test_make_sampler_policy_routes_adapters_and_seeds():
    seen = []

    class FakeSampler:
        def generate(self, params, adapter, prompts, sampling, *, seed):
            seen.append((params, adapter, seed))
            return [Generation([3], [-0.5], "stop", "t")] * len(prompts)

    pol = R.make_sampler_policy(FakeSampler(), "P", {P.META_THINKING: "A_mta", P.REASONING: None}, seed=7)
    sp = _cfg().sampling_params()
    pol(P.META_THINKING, [[1]], sp)
    pol(P.REASONING, [[1], [2]], sp)
    assert seen == [("P", "A_mta", 7 * 1_000_003), ("P", None, 7 * 1_000_003 + 1)]
    with pytest.raises(KeyError, match="no adapter for role 'single'"):
        pol(P.SINGLE, [[1]], sp)


def test_prefix_reuse_stats(tok, enc):
    (tr,) = R.run_rollout(ScriptedPolicy(tok, _finished_script()), enc, [Q], _cfg())
    st = R.prefix_reuse_stats([tr])
    t = tr.turns
    assert st["prompt_tokens"] == sum(x.prompt_len for x in t)
    assert st["reusable_prefix_tokens"] == (
        t[0].prompt_len + len(t[0].token_ids) + t[1].prompt_len + len(t[1].token_ids)
    )
    assert 0 < st["reusable_fraction"] < 1


# ------------------------------------------------------------------------ real tokenizer check


@functools.lru_cache(maxsize=1)
def _smollm2_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.mark.real_model
def test_smollm2_tokenizer_splicing(smollm2_gguf):
    tok = _smollm2_tokenizer(smollm2_gguf)
    enc = R.ChatEncoder(tok)
    pol = ScriptedPolicy(tok, _finished_script())
    cfg = _cfg()
    (tr,) = R.run_rollout(pol, enc, [Q], cfg)
    assert tr.finish_reason == R.FINISHED
    ps = cfg.prompts
    ra2 = pol.role_calls(P.REASONING)[1][1][0]
    assert ra2 == _chat_ids(
        tok,
        [
            {"role": "system", "content": ps[P.REASONING].system},
            {"role": "user", "content": f"Question:\n{Q}\n\nInstruction:\n{M1}"},
            {"role": "assistant", "content": R1},
            {"role": "user", "content": M2},
        ],
    )
    for role in (P.META_THINKING, P.REASONING):
        seqs = R.build_role_sequences([tr], enc, cfg, role)
        _check_rows(seqs, [tr], role, tok)
        assert re.search(r"<\|im_start\|>system\n", tok.decode(seqs.tokens[0].tolist()))


def test_single_turn_judge_mode(tok, enc):
    script = {P.META_THINKING: [[("Compare accuracy.", "eos")]], P.REASONING: [[("[[B]]", "eos")]]}
    pol = ScriptedPolicy(tok, script)
    cfg = _cfg(mode="single_turn", task="judge")
    (tr,) = R.run_rollout(pol, enc, [P.judge_fields("Which is right?", "2+2=5", "2+2=4")], cfg)
    assert tr.finish_reason == R.FINISHED and tr.final_answer == "[[B]]"
    mta_text = tok.decode(pol.role_calls(P.META_THINKING)[0][1][0])
    assert "[User Question] Which is right? [End of User Question]" in mta_text
    assert "2+2=5" not in mta_text  # the planner sees only the question
    ra_text = tok.decode(pol.role_calls(P.REASONING)[0][1][0])
    assert "2+2=5" in ra_text and "2+2=4" in ra_text and "Compare accuracy." in ra_text
