"""A character-level tokenizer built in memory, for tests, doctests and examples (no hub download).

The result is a real :class:`transformers.PreTrainedTokenizerFast` backed by the
``tokenizers`` library (a WordLevel model over single characters), so padding,
``apply_chat_template`` and ``decode`` behave as they do for a downloaded one.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SPECIALS", "char_tokenizer"]

#: Special tokens, ids 0-3 in this order.
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")

_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 +-=:?.,!\n"


def char_tokenizer(
    alphabet: str = _ALPHABET,
    *,
    pad: bool = True,
    add_bos: bool = False,
    chat_template: str | None = None,
) -> Any:
    """One id per character of ``alphabet`` after :data:`SPECIALS`; unknown characters map to ``<unk>``.

    ``pad=False`` leaves ``pad_token`` unset (as many base-model tokenizers ship);
    ``add_bos=True`` prepends ``<bos>`` when ``add_special_tokens`` is on (a
    ``TemplateProcessing`` post-processor, as Llama's tokenizer does);
    ``chat_template`` is a jinja template for ``apply_chat_template``.

    >>> tok = char_tokenizer()
    >>> tok("ab").input_ids, tok.decode([4, 5]), tok.pad_token_id, tok.eos_token_id
    ([4, 5], 'ab', 0, 2)
    >>> char_tokenizer(add_bos=True)("ab").input_ids
    [1, 4, 5]
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = list(dict.fromkeys(alphabet))
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({c: i + len(SPECIALS) for i, c in enumerate(chars)})
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # every character is its own pre-token (spaces included), so WordLevel maps characters
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    if add_bos:
        core.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 1)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
        pad_token="<pad>" if pad else None,
    )
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok
