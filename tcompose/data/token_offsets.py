"""Caption text -> token positions from a fast tokenizer's character offsets: T5 (FLUX.1), and SD3's CLIP + T5 sequence.

    t5_phrase_positions(t5_tokenizer, caption, ["cat", "hot dog"], max_sequence_length=512)      # FLUX: T5 only
    sd3_phrase_positions(clip_tokenizer, t5_tokenizer, caption, phrases, max_sequence_length=256)  # SD3 / SD3.5

A SentencePiece tokenizer (T5's) does not mark word ends as CLIP's BPE does, and a word encoded alone can split
differently from the same word in its caption (``▁`` before it, or not). So the caption is tokenized once, exactly
as the pipeline tokenizes it (``padding="max_length"``, ``max_length=max_sequence_length``, truncation, ``</s>``),
with ``return_offsets_mapping``, and each token is mapped to the caption's characters; the phrase is never
re-encoded. Words are read from the caption text itself: runs of letters and digits, and single punctuation
marks. A word's positions are those of every token whose character span overlaps it (a word split into several
pieces, "skateboarder" -> ``▁skate`` ``board`` ``er``, contributes all of them, a lone ``▁`` piece before it too).

The matching rules are those of :mod:`tcompose.data.text` for CLIP, and its matcher is reused: whole words,
case-insensitive; joining punctuation (``- _ / '``) skipped on both sides ("wine-glass" matches "wine glass"); other
punctuation ends a match; phrases with more words claim their tokens first and each occurrence is used once ("a hot
dog and a dog": "dog" gets the second dog); None when the phrase is absent, or truncated away (a word whose last
characters fall past the last kept token counts as cut, as in CLIP).

SD3's text sequence (``StableDiffusion3Pipeline.encode_prompt``) is the two CLIP encoders' 77 tokens (their hidden
states side by side, zero-padded to T5's width) followed by T5's ``max_sequence_length`` tokens: position ``p`` of
the T5 ids is column ``77 + p`` of the joint attention's text keys. Decision: a phrase supervises its tokens in
**both** parts (``which="both"``, the default): the transformer reads the noun from both encoders and attends to
both copies, so supervising one copy would leave the other free to put the noun's attention outside its mask, and
the pixel loss, which sums a word's probabilities over its tokens, would see only part of the noun's attention. A
phrase present in one part only (cut off by CLIP's 77 tokens but within T5's limit) keeps the positions it has.
``which="clip"`` or ``"t5"`` restricts the supervision to one part (for ablations). CLIP positions come from
:func:`tcompose.data.text.phrases_token_positions` (SD3's two CLIP tokenizers share CLIP's BPE, so one set of
positions serves both); T5 positions from the offsets as above.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import torch

from .text import JOINERS, _segments, claim_positions, phrases_token_positions

__all__ = ["SD3_TEXT_PARTS", "caption_words", "offset_words", "sd3_phrase_positions", "t5_input_ids",
           "t5_phrase_positions"]

#: The parts of SD3's text sequence a phrase may supervise (``which``).
SD3_TEXT_PARTS = ("both", "clip", "t5")
# A run of letters / digits, or one other visible character.
_PIECE = re.compile(r"[^\W_]+|[^\w\s]|_")


def _kind(text: str) -> str:
    if text[0].isalnum():
        return "word"
    return "join" if text in JOINERS else "punct"


def caption_words(text: str) -> list[tuple[str, str, int, int]]:
    """(kind, lowercased text, start, end) of each word and punctuation mark of ``text``; kind: "word", "join"
    (joining punctuation) or "punct"."""
    return [(_kind(m.group()), m.group().lower(), m.start(), m.end()) for m in _PIECE.finditer(text)]


def _encode(tokenizer: Any, captions: str | Sequence[str], max_sequence_length: int, offsets: bool):
    return tokenizer(captions, padding="max_length", max_length=max_sequence_length, truncation=True,
                     add_special_tokens=True, return_offsets_mapping=offsets,
                     return_tensors=None if offsets else "pt")


def t5_input_ids(tokenizer: Any, captions: str | Sequence[str], max_sequence_length: int) -> torch.Tensor:
    """T5 input ids as SD3's and FLUX's pipelines make them (padded to ``max_sequence_length``, truncated, ``</s>``
    appended): LongTensor ``[B, max_sequence_length]``."""
    if isinstance(captions, str):
        captions = [captions]
    return _encode(tokenizer, list(captions), max_sequence_length, offsets=False).input_ids.long()


def offset_words(tokenizer: Any, caption: str, max_sequence_length: int) -> list[tuple[str, str, list[int]]]:
    """(kind, text, positions) of each word and punctuation mark of ``caption``, positions in its padded ids (see
    the module docstring); kind "break" for one cut or dropped by truncation."""
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"{type(tokenizer).__name__} gives no character offsets; load the model's fast tokenizer")
    enc = _encode(tokenizer, caption, max_sequence_length, offsets=True)
    special = set(tokenizer.all_special_ids)
    spans = [(pos, s, e) for pos, (tid, (s, e)) in enumerate(zip(enc["input_ids"], enc["offset_mapping"]))
             if tid not in special and e > s]
    kept_end = max((e for _, _, e in spans), default=0)
    out: list[tuple[str, str, list[int]]] = []
    for kind, text, start, end in caption_words(caption):
        positions = [pos for pos, s, e in spans if s < end and e > start]
        if not positions or end > kept_end:
            out.append(("break", "", []))
        else:
            out.append((kind, text, positions))
    return out


def _phrase_words(phrase: str) -> list[str]:
    return [text for kind, text, _, _ in caption_words(phrase) if kind == "word"]


def t5_phrase_positions(tokenizer: Any, caption: str, phrases: Sequence[str],
                        max_sequence_length: int = 512) -> list[list[int] | None]:
    """Each phrase's positions in the caption's T5 ids (``max_sequence_length`` of them, ``</s>`` after the text), or
    None; longer phrases claim their tokens first, each occurrence used once (the module docstring has the rules)."""
    segments = _segments(offset_words(tokenizer, caption, max_sequence_length))
    return claim_positions(segments, [_phrase_words(p) for p in phrases])


def sd3_phrase_positions(clip_tokenizer: Any, t5_tokenizer: Any, caption: str, phrases: Sequence[str],
                         max_sequence_length: int = 256, which: str = "both") -> list[list[int] | None]:
    """Each phrase's positions in SD3's text sequence (CLIP's ``model_max_length`` (77) ids, then T5's
    ``max_sequence_length``): its CLIP positions, its T5 positions shifted by 77, or both (``which``; see the
    module docstring for the choice); None when it is in none of the parts supervised."""
    if which not in SD3_TEXT_PARTS:
        raise ValueError(f"which={which!r}: choose one of {', '.join(SD3_TEXT_PARTS)}")
    n_clip = clip_tokenizer.model_max_length
    clip = phrases_token_positions(clip_tokenizer, caption, phrases) if which != "t5" else [None] * len(phrases)
    t5 = (t5_phrase_positions(t5_tokenizer, caption, phrases, max_sequence_length) if which != "clip"
          else [None] * len(phrases))
    out: list[list[int] | None] = []
    for c, t in zip(clip, t5):
        positions = list(c or ()) + [n_clip + p for p in (t or ())]
        out.append(positions or None)
    return out
