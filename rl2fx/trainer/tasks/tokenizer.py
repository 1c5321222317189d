"""A word-level tokenizer for the digit tasks, built locally (no hub download).

The vocabulary is tiny on purpose: special tokens, the ten digits and a few
separators. A small vocabulary keeps chance-level reward well above zero, so a
tiny randomly initialised model gets a learning signal from its first rollouts.
The result is a real :class:`transformers.PreTrainedTokenizerFast` (backed by
the ``tokenizers`` WordLevel model), so ``model.generate`` and the usual
``tokenizer(...)`` / ``tokenizer.decode(...)`` calls work unchanged.
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

__all__ = ["SPECIAL_TOKENS", "DIGITS", "SEPARATORS", "VOCAB", "build_tokenizer"]

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
DIGITS = tuple(str(d) for d in range(10))
SEPARATORS = (":", "+", "=")
#: token string -> id, in a fixed order so that ids never depend on the machine.
VOCAB: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + DIGITS + SEPARATORS)}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Build the digit-task tokenizer in memory: whitespace-split words, one id each.

    >>> tok = build_tokenizer()
    >>> tok("<bos> 3 1 :", add_special_tokens=False)["input_ids"]
    [1, 6, 4, 13]
    >>> tok.decode([6, 4, 2]), len(tok), tok.pad_token_id, tok.eos_token_id
    ('3 1 <eos>', 16, 0, 2)
    """
    core = Tokenizer(models.WordLevel(vocab=dict(VOCAB), unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
        unk_token="<pad>", padding_side="left",
    )
    return tok
