"""Prompt tokenization, as the glyffuser does it."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from torch import Tensor
from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


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
