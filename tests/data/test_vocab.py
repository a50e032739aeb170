"""Caption words -> categories: hand-made edge cases and real COCO captions."""

from __future__ import annotations

import json
import re

import pytest

from tcompose.data.coco import CocoDataset
from tcompose.data.vocab import Vocabulary, default_vocabulary, match_categories, normalize_name, pluralize


@pytest.mark.parametrize(
    "word, plural",
    [
        ("bike", "bikes"), ("bus", "buses"), ("glass", "glasses"), ("wine glass", "wine glasses"),
        ("box", "boxes"), ("sandwich", "sandwiches"), ("dish", "dishes"), ("pony", "ponies"), ("toy", "toys"),
        ("man", "men"), ("policeman", "policemen"), ("human", "humans"), ("woman", "women"),
        ("child", "children"), ("person", "people"), ("mouse", "mice"), ("knife", "knives"), ("calf", "calves"),
        ("sheep", "sheep"), ("skis", "skis"), ("scissors", "scissors"), ("potato", "potatoes"),
        ("piano", "pianos"), ("hot dog", "hot dogs"), ("ox", "oxen"),
    ],
)
def test_pluralize(word, plural):
    assert pluralize(word) == plural


def test_whole_words_only():
    assert match_categories("A cat watches the catch.", ["cat"]) == [("cat", "cat")]
    assert match_categories("Someone will catch it; concatenate", ["cat"]) == []
    assert match_categories("a catcher and a category", ["cat"]) == []
    assert match_categories("cupcakes in a cupboard", ["cup"]) == []


def test_longest_match_first():
    cats = ["wine glass", "cup", "dog", "hot dog", "bear", "teddy bear"]
    assert match_categories("A wine glass next to a glass", cats) == [("wine glass", "wine glass")]
    assert match_categories("a hot dog on a plate", ["dog", "person"]) == []
    assert match_categories("a hot dog and a dog", cats) == [("hot dog", "hot dog"), ("dog", "dog")]
    assert match_categories("a teddy bear", ["bear"]) == []
    assert match_categories("a teddy bear", cats) == [("teddy bear", "teddy bear")]
    # a compound whose first word is itself a term names its head
    assert match_categories("a giant hot dog cake", ["hot dog", "dog", "cake"]) == [("cake", "cake")]
    assert match_categories("two microwave ovens", ["microwave", "oven"]) == [("microwave ovens", "microwave")]


def test_plurals_case_punctuation_and_order():
    cats = ["person", "bicycle", "knife", "dog", "cat"]
    assert match_categories("Two MEN ride Bikes; knives, too!", cats) == [
        ("men", "person"), ("bikes", "bicycle"), ("knives", "knife")
    ]
    assert match_categories("A DOG, a Cat... and a dog.", cats) == [("dog", "dog"), ("cat", "cat")]
    assert match_categories("The man's dog", cats) == [("man", "person"), ("dog", "dog")]
    assert match_categories("hot-dogs and wine-glasses", ["hot dog", "wine glass"]) == [
        ("hot-dogs", "hot dog"), ("wine-glasses", "wine glass")
    ]
    # punctuation between two words breaks a multi-word term
    assert match_categories("it was hot, dog days", ["hot dog", "dog"]) == [("dog", "dog")]


def test_only_given_categories_and_resolution_order():
    assert match_categories("a man on a bike", ["bicycle"]) == [("bike", "bicycle")]
    assert match_categories("a man on a bike", ["motorcycle", "person"]) == [
        ("man", "person"), ("bike", "motorcycle")
    ]
    assert match_categories("a man on a bike", ["motorcycle", "bicycle"]) == [("bike", "bicycle")]
    assert match_categories("a glass of water", ["cup"]) == [("glass", "cup")]
    assert match_categories("a sliding glass door", ["wine glass", "cup"]) == []
    assert match_categories("a bike rider", ["person", "bicycle"]) == [("rider", "person")]
    assert match_categories("anything at all", []) == []


def test_categories_outside_the_table():
    cats = ["ball", "cup", "box", "kite"]
    got = match_categories("a photo of two red balls, a box and three boxes near a blue cup", cats)
    assert got == [("balls", "ball"), ("box", "box"), ("cup", "cup")]
    # the exact name wins over a table synonym ("ball" is also a "sports ball" synonym)
    assert match_categories("a ball", ["sports ball", "ball"]) == [("ball", "ball")]
    assert match_categories("a ball", ["sports ball"]) == [("ball", "sports ball")]
    assert match_categories("two buses and a wine_glass", ["bus_(vehicle)", "wine_glass"]) == [
        ("buses", "bus_(vehicle)"), ("wine_glass", "wine_glass")
    ]
    assert match_categories("a red zeppelin and zeppelins", ["zeppelin"]) == [("zeppelin", "zeppelin")]


def test_extended_vocabulary_and_fingerprint():
    base = default_vocabulary()
    assert match_categories("a pooch", ["dog"]) == []
    more = base.extended({"dog": ["pooch"]}, not_objects=["dog house"])
    assert more.match("two pooches", ["dog"]) == [("pooches", "dog")]
    assert more.match("a dog house", ["dog"]) == []
    assert more.fingerprint() != base.fingerprint()
    assert Vocabulary(base.table, base.not_objects).fingerprint() == base.fingerprint()
    assert "men" in base.terms("person") and "bikes" in base.terms("bicycle")


def test_table_covers_the_80_coco_categories(test_data):
    data = json.loads((test_data / "categories" / "coco80_categories.json").read_text())
    names = {normalize_name(c["name"]) for c in data["categories"]}
    assert len(names) == 80
    assert names == set(default_vocabulary().table)
    # every category is found by its own name in a caption
    for name in names:
        assert match_categories(f"there is a {name} here", [name]) == [(name, name)], name


def _fixture_pairs(coco_mini):
    coco = CocoDataset(coco_mini, "val2017")
    for image in coco:
        names = coco.category_names(image)
        for caption in image.captions:
            yield caption, names, match_categories(caption, names)


def test_real_coco_captions(coco_mini):
    seen = {"man": 0, "people": 0, "bike": 0, "fire hydrant": 0, "parking meter": 0, "stop sign": 0}
    n_matched = n_captions = 0
    for caption, names, got in _fixture_pairs(coco_mini):
        n_captions += 1
        n_matched += bool(got)
        words = re.findall(r"[a-z]+", caption.lower())
        text = " ".join(words)
        cats = [c for _, c in got]
        assert len(set(cats)) == len(cats) and set(cats) <= set(names)
        starts = []
        for phrase, _ in got:  # phrases are caption words, in caption order
            hit = re.search(rf"\b{re.escape(phrase)}\b", caption.lower())
            assert hit, (phrase, caption)
            starts.append(hit.start())
        assert starts == sorted(starts), (caption, got)
        if "person" in names and "man" in words and "men" not in words:
            seen["man"] += 1
            assert "person" in cats, caption
        if "person" in names and "people" in words:
            seen["people"] += 1
            assert ("people", "person") in got, caption
        if ("bicycle" in names or "motorcycle" in names) and "bike" in words:
            seen["bike"] += 1
            assert any(p.endswith("bike") and c in ("bicycle", "motorcycle") for p, c in got), caption
        for multi in ("fire hydrant", "parking meter", "stop sign"):
            if multi in names and multi in text:
                seen[multi] += 1
                assert (multi, multi) in got or (multi + "s", multi) in got, caption
    assert all(seen.values()), seen  # the fixture has captions of each kind
    assert n_matched / n_captions > 0.9


def test_real_coco_specific_captions(coco_mini):
    got = {caption.strip(): pairs for caption, _, pairs in _fixture_pairs(coco_mini)}
    assert got["A newly married couple cutting up a  giant hot dog cake."] == [("cake", "cake")]
    assert got["A baseball player holding a baseball bat during a game."] == [
        ("baseball player", "person"), ("baseball bat", "baseball bat")
    ]
    assert got["A man reaches his tennis racket up to hit the ball."] == [
        ("man", "person"), ("tennis racket", "tennis racket"), ("ball", "sports ball")
    ]
    assert got["Two people wearing helmets riding motor bikes in the woods."] == [
        ("people", "person"), ("motor bikes", "motorcycle")
    ]
    assert got["A person with a umbrella and a glass at a table."] == [
        ("person", "person"), ("umbrella", "umbrella"), ("glass", "wine glass"), ("table", "dining table")
    ]
