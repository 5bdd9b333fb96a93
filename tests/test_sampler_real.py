"""Real-model sampler checks on the embedded SmolLM2-135M-Instruct GGUF (fp32 both sides)."""

import hf_reference  # tests/hf_reference.py
import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.real_model

CHATS = [
    "What is 7 times 8?",
    "Write one sentence about the sea.",
    "Solve (3t^2+5t+a)(4t^2+bt-2) = 12t^4+26t^3-8t^2-16t+6; find a+b.",
    "List three prime numbers.",
]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def model(smollm2_gguf):
    from rema_jax.models.hub import load

    return load(str(smollm2_gguf))


def _prompt(tokenizer, text):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_greedy_matches_transformers_generate_token_for_token(model, smollm2_gguf):
    torch = pytest.importorskip("torch")
    from rema_jax.sampling import Sampler, SamplingParams

    prompts = [_prompt(model.tokenizer, c) for c in CHATS]
    sampler = Sampler(model.config, model.tokenizer, max_cache_len=256)
    # One batch of rows of different lengths (left padding), EOS active.
    ours = sampler.generate(model.params, None, prompts, SamplingParams(max_new_tokens=NEW_TOKENS, greedy=True))

    torch.set_num_threads(2)
    hf = hf_reference.load_smollm2(smollm2_gguf)
    eos = model.tokenizer.eos_token_id
    for prompt, g in zip(prompts, ours):
        with torch.inference_mode():
            out = hf.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False,
                max_new_tokens=NEW_TOKENS,
                eos_token_id=eos,
                pad_token_id=eos,
            )
        want = out[0, len(prompt) :].tolist()
        assert g.token_ids == want, (model.tokenizer.decode(g.token_ids), model.tokenizer.decode(want))
        assert g.finish_reason == ("stop" if want[-1] == eos else "length")
        assert np.all(np.asarray(g.logprobs) <= 0)


def test_finish_stop_string_on_the_real_tokenizer(model):
    from rema_jax.sampling import stops

    tok = model.tokenizer
    table = stops.token_bytes(tok, model.config.vocab_size)
    for i in range(0, len(tok), 97):  # byte tables agree with the tokenizer's own decoding
        assert table[i] == tok.decode([i]).encode("utf-8") or b"\xef\xbf\xbd" in tok.decode([i]).encode(), i
    ids = tok.encode("Done. [FINISH] The end")
    assert len(tok.encode("[FINISH]")) > 1
    tables = stops.StopTables(
        *map(jnp.asarray, stops.build_token_table(table)), *map(jnp.asarray, stops.build_stop_arrays(("[FINISH]",)))
    )
    hist, hits = stops.init_history(1, tables), []
    for t in ids:
        hist, hit = stops.update_and_match(hist, jnp.asarray([t]), tables)
        hits.append(bool(hit[0]))
    end = next(i for i in range(len(ids)) if "[FINISH]" in tok.decode(ids[: i + 1]))
    assert hits == [i == end for i in range(len(ids))]
