"""Supervised warm-start (SFT) of the ReMA agents: data, tokenization with role loss masks, training."""

from rema_jax.sft.data import SFT_ROLES, Conversation, builtin_conversations, load_alpaca_file, parse_alpaca_record
from rema_jax.sft.tokenize import EncodedConversation, encode_all, encode_conversation, epoch_batches
from rema_jax.sft.worked import WorkedExample, WorkedExampleError, worked_example

__all__ = [
    "SFT_ROLES",
    "Conversation",
    "EncodedConversation",
    "WorkedExample",
    "WorkedExampleError",
    "builtin_conversations",
    "encode_all",
    "encode_conversation",
    "epoch_batches",
    "load_alpaca_file",
    "parse_alpaca_record",
    "worked_example",
]
