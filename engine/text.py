"""Prompt tokenization, as the glyffuser does it."""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence

from torch import Tensor
from transformers import PreTrainedTokenizerBase, T5Tokenizer

from glyph_engine.errors import GlyphEngineError

logger = logging.getLogger(__name__)


def check_prompts(prompts: Sequence[str]) -> None:
    """Refuses prompts the tokenizer cannot take (none, empty ones, bytes that are not UTF-8) and
    prompts with nothing to draw: only control, format or space characters such as NUL or ESC.

    Python decodes undecodable command-line bytes to lone surrogates; they only fail deep
    inside the tokenizer, so they are caught here.
    """
    if not prompts or any(not p.strip() for p in prompts):
        raise GlyphEngineError('a prompt is empty; give each prompt some text, e.g. glyph-engine generate "metal".')
    for prompt in prompts:
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:
            raw = prompt.encode("utf-8", "surrogateescape")  # the bytes as they were given
            raise GlyphEngineError(
                f"prompt {raw!r} is not valid UTF-8 text; check the terminal's or file's encoding."
            ) from None
        if not any(c.isprintable() and not c.isspace() for c in prompt):
            raise GlyphEngineError(
                f'prompt {prompt[:40]!r} has no printable character; give each prompt some visible text, e.g. "metal".'
            )


def tokenize(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_length: int) -> tuple[Tensor, Tensor]:
    """Token ids and attention mask, padded to the longest prompt, truncated at `max_length`.

    Returns ``(input_ids, attention_mask)``, both (P, L) int64.
    """
    full_lengths = [len(ids) for ids in tokenizer(list(prompts))["input_ids"]]
    for prompt, n in zip(prompts, full_lengths, strict=True):
        if n > max_length:
            logger.warning("prompt of %d tokens truncated to %d: %.60s...", n, max_length, prompt)
    tokens = tokenizer(list(prompts), padding="longest", max_length=max_length, truncation=True, return_tensors="pt")
    return tokens["input_ids"], tokens["attention_mask"]


def train_tokenizer(sentences: Sequence[str], vocab_size: int) -> T5Tokenizer:
    """A T5 tokenizer over a sentencepiece unigram model trained on `sentences`.

    T5's id layout: <pad>=0, </s>=1, <unk>=2, no <s>; 100 sentinel tokens appended.
    `vocab_size` is an upper bound: small corpora get fewer pieces.
    """
    import sentencepiece as spm  # only training needs the trainer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
    return T5Tokenizer(vocab=vocab)
