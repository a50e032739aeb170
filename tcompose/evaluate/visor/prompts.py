"""VISOR's SR2D prompts, built in code exactly as VISOR's ``create_spatial_phrases.py`` builds them.

Gokhale et al. 2022, "Benchmarking Spatial Relationships in Text-to-Image Generation" (github microsoft/VISOR):
COCO's 80 category names in COCO's order; every unordered pair in ``itertools.combinations`` order; for each
pair, each relation of :data:`RELATIONS` in turn, first "A rel B" then "B rel A"; then "A and B", "B and A";
after all pairs, the 80 single-object prompts. Names take their English indefinite article ("an airplane", "an
umbrella", "a hair drier"). ``unique_id`` counts from 0 in that order: 3,160 pairs x 10 + 80 = 31,680 prompts,
25,280 of them two-object spatial ones (the only ones VISOR scores). Nothing is downloaded.

Each record keeps the original's fields: ``unique_id``, ``num_objects``, ``obj_1_attributes`` (``[name]``),
``obj_2_attributes`` (``[name]``, ``[None]`` for a single object), ``rel_type`` (a relation, ``"and"`` or
``"single"``) and ``text``.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from functools import lru_cache

from ...data.categories import COCO_80
from ...io.errors import UserError

RELATIONS = ("to the left of", "to the right of", "above", "below")
N_PROMPTS = 31_680
N_SPATIAL = 25_280


def indefinite_article(noun: str) -> str:
    """``"a"`` or ``"an"`` as English (and the ``inflect`` package VISOR used) gives it for COCO's names: "an"
    before a vowel letter, "a" before a consonant (no COCO name starts with a silent "h", a "you"-sounding "u"
    or "eu", or an acronym)."""
    return "an" if noun[:1].lower() in "aeiou" else "a"


def _a(noun: str) -> str:
    return f"{indefinite_article(noun)} {noun}"


@lru_cache(maxsize=1)
def _records() -> tuple[dict, ...]:
    data: list[dict] = []

    def add(n: int, a: str, b: str | None, rel: str, text: str) -> None:
        data.append({"unique_id": len(data), "num_objects": n, "obj_1_attributes": [a], "obj_2_attributes": [b],
                     "rel_type": rel, "text": text})

    for s1, s2 in itertools.combinations(COCO_80, 2):
        for rel in RELATIONS:
            add(2, s1, s2, rel, f"{_a(s1)} {rel} {_a(s2)}")
            add(2, s2, s1, rel, f"{_a(s2)} {rel} {_a(s1)}")
        add(2, s1, s2, "and", f"{_a(s1)} and {_a(s2)}")
        add(2, s2, s1, "and", f"{_a(s2)} and {_a(s1)}")
    for s in COCO_80:
        add(1, s, None, "single", _a(s))
    return tuple(data)


def sr2d_prompts() -> list[dict]:
    """VISOR's SR2D set: 31,680 records in the original's order and fields (see the module docstring)."""
    return [dict(r, obj_1_attributes=list(r["obj_1_attributes"]), obj_2_attributes=list(r["obj_2_attributes"]))
            for r in _records()]


def is_spatial(record: dict) -> bool:
    """A two-object prompt with a spatial relation: the prompts VISOR's scores count."""
    return record["num_objects"] == 2 and record["rel_type"] in RELATIONS


@dataclass(frozen=True)
class VisorPrompt:
    """One prompt to generate and detect: ``prompt_id`` is VISOR's ``unique_id``; ``categories`` the two objects
    (the detector's queries); ``relation`` how object 1 must sit relative to object 2."""

    prompt_id: int
    text: str
    categories: tuple[str, str]
    relation: str

    def to_dict(self) -> dict:
        return {"unique_id": self.prompt_id, "text": self.text, "objects": list(self.categories),
                "rel_type": self.relation}

    @classmethod
    def from_dict(cls, d: dict) -> "VisorPrompt":
        return cls(int(d["unique_id"]), d["text"], tuple(d["objects"]), d["rel_type"])


def spatial_prompts(n: int | None = None, seed: int = 0) -> list[VisorPrompt]:
    """The two-object spatial prompts, all 25,280 (``n=None``) or ``n`` of them drawn with ``seed`` and given in
    ``unique_id`` order (the file's order puts every "person" prompt first, so the first N would be one-sided)."""
    records = [r for r in _records() if is_spatial(r)]
    if n is not None:
        if not 1 <= n <= len(records):
            raise UserError(f"--prompts must be between 1 and {len(records)} (the spatial prompts), got {n}")
        records = sorted(random.Random(seed).sample(records, n), key=lambda r: r["unique_id"])
    return [VisorPrompt(r["unique_id"], r["text"], (r["obj_1_attributes"][0], r["obj_2_attributes"][0]),
                        r["rel_type"]) for r in records]
