"""Prompt tokenization, as the glyffuser does it."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from tokenizers import Tokenizer
from torch import Tensor

from glyph_engine.errors import GlyphEngineError

if TYPE_CHECKING:  # transformers costs about a second to import: training and the peer only
    from transformers import PreTrainedTokenizerBase, T5Tokenizer

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


class PromptTokenizer:
    """The model's tokenizer as the engine runs it: the `tokenizers` library alone.

    It is the same Rust tokenizer a Hugging Face fast tokenizer drives, set as that tokenizer's
    call with ``padding="longest", truncation=True, max_length=max_length`` sets it; tests
    compare the two. A warm start then never imports transformers (about a second here).
    Settings are fixed at construction, so one instance serves several threads.
    """

    def __init__(self, tokenizer: Tokenizer, pad_token: str, max_length: int):
        pad_id = tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise ValueError(f"pad token {pad_token!r} is not in the vocabulary")
        self.pad_id = pad_id
        self.max_length = max_length
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self._tokenizer = Tokenizer.from_str(tokenizer.to_str())  # a copy: its settings are ours
        self._tokenizer.enable_truncation(max_length)
        self._tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token)

    @classmethod
    def from_files(cls, files: dict[str, bytes], max_length: int) -> PromptTokenizer | None:
        """From the files a Hugging Face tokenizer saves; None without a `tokenizer.json`."""
        if "tokenizer.json" not in files:
            return None
        config: dict[str, Any] = json.loads(files.get("tokenizer_config.json", b"{}"))
        pad = config.get("pad_token", "<pad>")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        return cls(Tokenizer.from_str(files["tokenizer.json"].decode()), str(pad), max_length)

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerBase, max_length: int) -> PromptTokenizer:
        """The engine's view of a loaded Hugging Face fast tokenizer."""
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise GlyphEngineError(
                f"the tokenizer ({type(tokenizer).__name__}) has no `tokenizers` backend; save it as a fast "
                "tokenizer (tokenizer.json) and load the model again."
            )
        return cls(backend, str(tokenizer.pad_token), max_length)

    def __call__(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Token ids and attention mask, padded to the longest prompt, truncated at `max_length`
        (with a warning). Returns ``(input_ids, attention_mask)``, both (P, L) int64."""
        encodings = self._tokenizer.encode_batch(list(prompts))
        for prompt, encoding in zip(prompts, encodings, strict=True):
            if encoding.overflowing:
                logger.warning("prompt truncated to %d tokens: %.60s...", self.max_length, prompt)
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
        return ids, mask


def train_tokenizer(sentences: Sequence[str], vocab_size: int) -> T5Tokenizer:
    """A T5 tokenizer over a sentencepiece unigram model trained on `sentences`.

    T5's id layout: <pad>=0, </s>=1, <unk>=2, no <s>; 100 sentinel tokens appended.
    `vocab_size` is an upper bound: small corpora get fewer pieces.
    """
    import sentencepiece as spm  # only training needs the trainer
    from transformers import T5Tokenizer

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
