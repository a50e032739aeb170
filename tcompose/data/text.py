"""Caption text -> CLIP token positions (which columns of a cross-attention map belong to a phrase).

``phrase_token_positions(tokenizer, caption, phrase)`` gives the positions, in the caption's padded
``tokenizer.model_max_length`` (77) input ids with ``<|startoftext|>`` at 0, of the phrase's tokens at its
first whole-word occurrence. ``phrases_token_positions(tokenizer, caption, phrases)`` does it for all the
phrases of a caption at once, each occurrence used once and longer phrases first (training and attnviz use
it: in "a hot dog and a dog", "dog" is the second dog). ``noun_phrases(caption)`` gives the groundable noun phrases of a caption, as
written in it (see :mod:`tcompose.data.nouns`: the bundled noun vocabulary, or spaCy with ``method="spacy"``).

Matching rules (word level, never inside a word):

- Words are CLIP's pre-tokens: letter runs, single digits, contractions (``'s``), punctuation runs. Each
  ends in a token carrying ``</w>``, so every token maps back to its word; a word split into several BPE
  pieces ("skateboarder" -> ``skate`` ``boarder</w>``) contributes all its positions.
- Case-insensitive (CLIP lowercases). "cat" never matches "catch", "cats" or the ``cat`` piece of "catalog".
- Joining punctuation (hyphens, underscores, slashes, apostrophes) is ignored on both sides and its tokens
  are not returned: "Wine-glass", "wine glass" and "wine/glass" all match each other, giving the positions of
  ``wine`` and ``glass``. Other punctuation in the caption (``, . ; : ! ? ( ) "`` ...) ends a match, so a
  phrase never spans two clauses; punctuation in the phrase itself is ignored. Spelling differences are not
  bridged: "wineglass" is one word and does not match "wine glass".
- None when the phrase has no word, does not occur, or occurs only past the truncation limit (including a
  word cut in the middle by truncation).
"""

from __future__ import annotations

from typing import Any, Collection, Iterable, Sequence

import torch

from .clip_bpe import symbols_to_text
from .nouns import noun_phrases

__all__ = ["claim_positions", "noun_phrases", "phrase_token_positions", "phrases_token_positions", "tokenize_captions",
           "word_positions"]

# Punctuation that joins the parts of one name ("wine-glass", "t/shirt", "o'clock"): skipped, not a boundary.
JOINERS = frozenset("-\u2010\u2011_/'\u2019")
_EOW = "</w>"


def tokenize_captions(tokenizer: Any, captions: str | Sequence[str]) -> torch.Tensor:
    """Input ids of ``captions``, padded and truncated to ``tokenizer.model_max_length``: LongTensor [B, 77]."""
    if isinstance(captions, str):
        captions = [captions]
    enc = tokenizer(
        list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    )
    return enc.input_ids.long()


def _words(tokenizer: Any, ids: Sequence[int]) -> list[tuple[str, str, list[int]]]:
    """(kind, text, positions) per pre-token; kind: "word", "join" (joining punctuation), "punct" (other
    punctuation), "break" (a special token, or a word cut by truncation)."""
    special = set(tokenizer.all_special_ids)
    tokens = tokenizer.convert_ids_to_tokens(list(ids))
    out: list[tuple[str, str, list[int]]] = []
    pieces: list[str] = []
    positions: list[int] = []
    for pos, (tid, tok) in enumerate(zip(ids, tokens)):
        if tid in special or tok is None:
            if pieces:  # an unfinished word: truncation cut it
                out.append(("break", "", []))
                pieces, positions = [], []
            out.append(("break", "", []))
            continue
        pieces.append(tok)
        positions.append(pos)
        if tok.endswith(_EOW):
            text = symbols_to_text("".join(pieces)[: -len(_EOW)]).lower()
            if any(ch.isalnum() for ch in text):
                kind = "word"
            elif text and all(ch in JOINERS for ch in text):
                kind = "join"
            else:
                kind = "punct"
            out.append((kind, text, positions))
            pieces, positions = [], []
    if pieces:
        out.append(("break", "", []))
    return out


def word_positions(tokenizer: Any, caption: str) -> list[tuple[str, list[int]]]:
    """Each pre-token word of ``caption`` (punctuation included) with its positions in the padded input ids;
    special tokens and a word cut by truncation left out."""
    ids = tokenize_captions(tokenizer, [caption])[0].tolist()
    return [(text, pos) for kind, text, pos in _words(tokenizer, ids) if kind != "break"]


def _segments(items: Iterable[tuple[str, str, list[int]]]) -> list[list[tuple[str, list[int]]]]:
    """Runs of words between breaks; joining punctuation dropped."""
    segments: list[list[tuple[str, list[int]]]] = [[]]
    for kind, text, pos in items:
        if kind == "word":
            segments[-1].append((text, pos))
        elif kind != "join" and segments[-1]:
            segments.append([])
    return [s for s in segments if s]


def _phrase_words(tokenizer: Any, phrase: str) -> list[str]:
    phrase_ids = tokenizer(phrase, add_special_tokens=False).input_ids
    return [text for kind, text, _ in _words(tokenizer, phrase_ids) if kind == "word"]


def _find(segments: list[list[tuple[str, list[int]]]], target: list[str], taken: Collection[int]) -> list[int] | None:
    n = len(target)
    for segment in segments:
        texts = [text for text, _ in segment]
        for start in range(len(segment) - n + 1):
            if texts[start : start + n] == target:
                pos = [p for _, ps in segment[start : start + n] for p in ps]
                if not taken or not any(p in taken for p in pos):
                    return pos
    return None


def phrase_token_positions(tokenizer: Any, caption: str, phrase: str, taken: Collection[int] = ()) -> list[int] | None:
    """Positions of ``phrase``'s tokens in the caption's padded input ids (start token = 0), at its first
    whole-word occurrence that uses none of the ``taken`` positions; None when absent or truncated away. See
    the module docstring for the rules."""
    target = _phrase_words(tokenizer, phrase)
    if not target:
        return None
    ids = tokenize_captions(tokenizer, [caption])[0].tolist()
    return _find(_segments(_words(tokenizer, ids)), target, taken)


def phrases_token_positions(tokenizer: Any, caption: str, phrases: Sequence[str]) -> list[list[int] | None]:
    """:func:`phrase_token_positions` of several phrases of one caption, each occurrence used once: phrases
    with more words claim their tokens first, so in "a hot dog and a dog" the phrase "dog" gets the second
    "dog", not the one inside "hot dog"; a repeated phrase gets its next occurrence. Tokenizes the caption once."""
    ids = tokenize_captions(tokenizer, [caption])[0].tolist()
    return claim_positions(_segments(_words(tokenizer, ids)), [_phrase_words(tokenizer, p) for p in phrases])


def claim_positions(segments: list[list[tuple[str, list[int]]]],
                    targets: Sequence[list[str]]) -> list[list[int] | None]:
    """Each target word list's positions in ``segments`` (runs of (word, positions) between breaks), longer
    targets first, each occurrence used once (the claiming rule of :func:`phrases_token_positions`)."""
    out: list[list[int] | None] = [None] * len(targets)
    taken: set[int] = set()
    for i in sorted(range(len(targets)), key=lambda i: -len(targets[i])):  # stable: caption order among equals
        if targets[i]:
            out[i] = _find(segments, targets[i], taken)
            taken.update(out[i] or ())
    return out
