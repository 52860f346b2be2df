"""A small deterministic character-level tokenizer, built locally (nothing downloaded).

One token per character of ``CHARSET`` plus three special tokens; the prompt gets ``<bos>``
in front. It is a real Hugging Face fast tokenizer (``tokenizers`` WordLevel model over
single characters), so ``save_pretrained`` / ``AutoTokenizer.from_pretrained`` round-trip it
and the trainers treat it like any other model's tokenizer.
"""

from __future__ import annotations

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, BOS, EOS)
"""Ids 0, 1, 2 in this order."""

CHARSET = "0123456789+-*=,() "
"""Every character the embedded tasks write, one token each (ids 3 ...)."""


def char_tokenizer(charset: str = CHARSET):
    """A ``PreTrainedTokenizerFast`` with one token per character of ``charset``.

    Encoding adds ``<bos>`` in front (``add_special_tokens=True``); decoding joins the
    characters with nothing between them. Padding is on the left, as generation needs.
    Characters outside ``charset`` map to ``<pad>``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if len(set(charset)) != len(charset):
        raise ValueError(f"charset has repeated characters: {charset!r}")
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *charset))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS,
                                   eos_token=EOS, unk_token=PAD, padding_side="left")


def load_tokenizer(path):
    """The tokenizer saved in the local directory ``path``: ``AutoTokenizer``, except that a
    tokenizer saved as a plain fast tokenizer (``tokenizer_class`` ``TokenizersBackend`` or
    ``PreTrainedTokenizerFast``, as ``char_tokenizer`` saves) loads as exactly that.

    Transformers 5 gives some model types their own tokenizer class whatever the saved
    config says (``qwen2``: ``Qwen2Tokenizer``), and that class rebuilds the pre-tokenizer
    (byte-level: a character tokenizer would lose its spaces).
    """
    import json
    from pathlib import Path

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    config = Path(path) / "tokenizer_config.json"
    declared = json.loads(config.read_text()).get("tokenizer_class") if config.exists() \
        else None
    if declared in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)
