"""A tiny byte-level BPE tokenizer with a ChatML template, trained in-process on the agents' system
prompts: real chat-template and EOS behaviour for rollout tests without loading a model."""

import functools

CHATML = (
    "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + "
    "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@functools.lru_cache(maxsize=None)
def chatml_bpe_tokenizer(extra_text: str):
    """Byte-level (any text encodes), 600 tokens, EOS ``<|im_end|>``; ``extra_text`` joins the corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from rema_jax.rollout import prompts as P

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [P.CODE_MT_MTA_SYSTEM, P.CODE_MT_RA_SYSTEM, P.PAPER_MAMRP_HIGH_SYSTEM, extra_text]
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus * 4, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf.chat_template = CHATML
    return hf
