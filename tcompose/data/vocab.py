"""Caption words -> dataset categories: which noun phrases of a caption name which annotated categories.

The synonym table (``resources/coco_synonyms.json``) lists, for each of the 80 COCO thing categories, the
singular words captions use for it (``person <- man, woman, people, skier, ...``); English plurals are
generated (``bikes``, ``glasses``, ``men``, ``knives``, ``ponies``). A category that is not in the table (a
synthetic dataset's ``ball``, an LVIS name such as ``wine_glass``) is matched by its own name and plural.

Matching, in :func:`match_categories`:

1. the caption is lower-cased and split into words (punctuation is a boundary; a possessive ``'s`` is
   dropped); multi-word terms match across spaces and hyphens only, never across punctuation;
2. terms are matched whole-word, longest first, left to right, against the whole table, not just the
   image's categories, so ``hot dog`` is consumed as one term and never yields ``dog``, ``teddy bear`` never
   yields ``bear``; ``not_objects`` (``glass door``, ``toilet paper``) are consumed and name nothing;
3. a term directly followed by another term is a modifier of it (English noun compounds put the head
   last): ``hot dog cake`` names a cake, ``bike rider`` a person, ``microwave ovens`` is its own term;
4. each remaining term is resolved to one of the given categories (a category named exactly by the term
   wins, then table order); each category is reported once, at its first phrase.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Iterable, Mapping, Sequence

_IRREGULAR = {
    "man": "men", "woman": "women", "person": "people", "child": "children", "mouse": "mice", "foot": "feet",
    "tooth": "teeth", "goose": "geese", "ox": "oxen", "louse": "lice", "die": "dice", "cactus": "cacti",
    "fungus": "fungi", "knife": "knives", "wife": "wives", "life": "lives", "leaf": "leaves", "loaf": "loaves",
    "shelf": "shelves", "wolf": "wolves", "half": "halves", "calf": "calves", "scarf": "scarves",
    "thief": "thieves", "elf": "elves",
}
_UNCHANGED = {
    "sheep", "deer", "fish", "moose", "bison", "aircraft", "series", "species", "scissors", "skis", "shears",
    "broccoli", "brocolli", "luggage", "baggage", "cattle", "people", "persons", "police", "glasses", "pants",
    "jeans", "shorts", "trousers", "equipment", "furniture", "busses", "salmon", "trout", "swine",
}
_O_ES = {"potato", "tomato", "hero", "echo", "veto", "torpedo", "mango", "volcano"}
_NOT_MAN = {"human", "german", "roman", "shaman", "talisman", "caiman", "ottoman"}


def pluralize(term: str) -> str:
    """The English plural of a word or of a compound's last word: ``bike -> bikes``, ``wine glass -> wine
    glasses``, ``man -> men``, ``policeman -> policemen``, ``knife -> knives``, ``pony -> ponies``."""
    head, _, last = term.rpartition(" ")
    prefix = head + " " if head else ""
    if last in _IRREGULAR:
        return prefix + _IRREGULAR[last]
    if last in _UNCHANGED or not last:
        return term
    if last.endswith("man") and len(last) > 3 and last not in _NOT_MAN:
        return prefix + last[:-3] + "men"
    if last.endswith(("s", "x", "z", "ch", "sh")):
        return prefix + last + "es"
    if len(last) > 1 and last.endswith("y") and last[-2] not in "aeiou":
        return prefix + last[:-1] + "ies"
    if last in _O_ES:
        return prefix + last + "es"
    return prefix + last + "s"


def normalize_name(name: str) -> str:
    """A category name as caption words: lower case, ``_``/``-`` as spaces, no parenthesised qualifier
    (``bus_(vehicle)`` -> ``bus``)."""
    name = re.sub(r"\([^)]*\)", " ", name.lower())
    return " ".join(re.sub(r"[_\-]+", " ", name).split())


# ----------------------------------------------------------------------------------------------------------
# Tokenising captions

_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")
_JOINABLE = re.compile(r"[\s\-_]+")  # what may sit between the words of one multi-word term


@dataclass(frozen=True)
class _Word:
    key: str  # lower-cased, possessive stripped: what terms are matched against
    start: int  # character span in the lower-cased caption (possessive excluded)
    end: int
    possessive: bool


def _words(text: str) -> list[_Word]:
    out = []
    for m in _WORD.finditer(text):
        word, end, possessive = m.group(), m.end(), False
        for suffix in ("'s", "’s"):
            if word.endswith(suffix) and len(word) > 2:
                word, end, possessive = word[: -len(suffix)], end - len(suffix), True
        out.append(_Word(word.replace("’", "'"), m.start(), end, possessive))
    return out


# ----------------------------------------------------------------------------------------------------------
# The vocabulary


class Vocabulary:
    """A synonym table: category -> the words naming it, plus phrases that name nothing.

    ``table`` maps a category name to singular terms (the category's own name is always a term, and every
    term's plural is added); ``not_objects`` are phrases consumed without naming a category.
    """

    def __init__(self, table: Mapping[str, Sequence[str]], not_objects: Sequence[str] = ()):
        self.table = {normalize_name(c): [normalize_name(t) for t in terms] for c, terms in table.items()}
        self.not_objects = sorted({normalize_name(p) for p in not_objects})
        # term (tuple of words) -> candidate categories in table order; [] marks a not-object phrase
        self.index: dict[tuple[str, ...], list[str]] = {}
        for phrase in self.not_objects:
            for form in _forms(phrase):
                self.index.setdefault(tuple(form.split()), [])
        for category, terms in self.table.items():
            for term in [category, *terms]:
                for form in _forms(term):
                    cands = self.index.setdefault(tuple(form.split()), [])
                    if category not in cands:
                        cands.append(category)
        self.max_words = max((len(k) for k in self.index), default=1)

    @classmethod
    def from_json(cls, path: str | Path) -> "Vocabulary":
        """Read a table file shaped like ``resources/coco_synonyms.json``."""
        data = json.loads(Path(path).read_text())
        return cls(data["categories"], data.get("not_objects", ()))

    def extended(self, table: Mapping[str, Sequence[str]] = (), not_objects: Sequence[str] = ()) -> "Vocabulary":
        """A new vocabulary with more terms for existing or new categories, and more not-object phrases."""
        merged = {c: list(t) for c, t in self.table.items()}
        for category, terms in dict(table).items():
            merged.setdefault(normalize_name(category), []).extend(terms)
        return Vocabulary(merged, [*self.not_objects, *not_objects])

    def fingerprint(self) -> str:
        """A short hash of the table: it decides which phrases a masks dataset gets."""
        blob = json.dumps({"table": self.table, "not_objects": self.not_objects}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def terms(self, category: str) -> list[str]:
        """Every form (singular and plural) that names ``category``, table or not."""
        name = normalize_name(category)
        out: list[str] = []
        for term in [name, *self.table.get(name, [])]:
            out += [f for f in _forms(term) if f not in out]
        return out

    def match(self, caption: str, categories: Iterable[str]) -> list[tuple[str, str]]:
        """See :func:`match_categories`."""
        given: dict[str, str] = {}  # normalised name -> the category as the caller spelled it
        for c in categories:
            given.setdefault(normalize_name(c), c)
        if not given:
            return []
        own: dict[tuple[str, ...], list[str]] = {}  # forms of the given names themselves (exact-name hits)
        for name in given:
            for form in _forms(name):
                own.setdefault(tuple(form.split()), []).append(name)
        max_words = max(self.max_words, *(len(k) for k in own))

        text = caption.lower()
        words = _words(text)
        spans: list[tuple[int, int, tuple[str, ...]]] = []  # (first word, end word, key)
        i = 0
        while i < len(words):
            for n in range(min(max_words, len(words) - i), 0, -1):
                if n > 1 and not _joined(text, words[i : i + n]):
                    continue
                key = tuple(w.key for w in words[i : i + n])
                if key in self.index or key in own:
                    spans.append((i, i + n, key))
                    i += n
                    break
            else:
                i += 1

        out: list[tuple[str, str]] = []
        used: set[str] = set()
        for k, (a, b, key) in enumerate(spans):
            nxt = spans[k + 1][0] if k + 1 < len(spans) else None
            if nxt == b and not words[b - 1].possessive and _joined(text, words[b - 1 : b + 1]):
                continue  # a modifier of the next term ("hot dog cake", "bike rider")
            cands = own.get(key, []) + [c for c in self.index.get(key, []) if c in given]
            if not cands or cands[0] in used:
                continue
            used.add(cands[0])
            phrase = " ".join(text[words[a].start : words[b - 1].end].split())
            out.append((phrase, given[cands[0]]))
        return out


def _forms(term: str) -> list[str]:
    plural = pluralize(term)
    return [term] if plural == term else [term, plural]


def _joined(text: str, words: Sequence[_Word]) -> bool:
    """Whether consecutive words are separated by spaces or hyphens only (one term, or a noun compound)."""
    return all(_JOINABLE.fullmatch(text[x.end : y.start]) for x, y in zip(words, words[1:]) if not x.possessive)


@lru_cache(maxsize=1)
def default_vocabulary() -> Vocabulary:
    """The bundled COCO table (``resources/coco_synonyms.json``)."""
    data = json.loads(resources.files("tcompose.data").joinpath("resources/coco_synonyms.json").read_text())
    return Vocabulary(data["categories"], data.get("not_objects", ()))


def match_categories(
    caption: str, categories: Iterable[str], vocab: Vocabulary | None = None
) -> list[tuple[str, str]]:
    """The ``(phrase, category)`` pairs for the caption's noun phrases that name one of ``categories``.

    In caption order, each category at most once (its first phrase); ``phrase`` is the caption's words as
    written (lower-cased, punctuation stripped, a trailing possessive dropped), ``category`` as given.
    ``match_categories("Two men ride bikes past a hot dog stand.", ["person", "bicycle", "dog"])
    == [("men", "person"), ("bikes", "bicycle")]``.
    """
    return (vocab or default_vocabulary()).match(caption, categories)
