"""tcompose.data.nouns: caption -> noun phrases, on a hand-checked table of real COCO captions and edge cases."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tcompose.data.nouns import NounVocabulary, default_nouns, load_nouns
from tcompose.data.text import noun_phrases, phrase_token_positions, tokenize_captions
from tcompose.data.clip_bpe import write_clip_tokenizer

# Real COCO val2017 captions (annotation id -> caption as stored, stripped) and their phrases, each checked
# by hand: bare nouns and compounds as written, plurals kept, skipped words gone, first occurrence only.
TABLE = {
    221865: ("A plane floating on top of a lake surrounded by mountains.", ["plane", "lake", "mountains"]),
    347013: ("A kitchen that has a tile floor, a refrigerator, a microwave, and a toaster.",
             ["kitchen", "floor", "refrigerator", "microwave", "toaster"]),
    360788: ("a couple skiers going down the snowy hill", ["skiers", "hill"]),
    370584: ("Man in apron standing on front of oven with pans and bakeware",
             ["man", "apron", "oven", "pans", "bakeware"]),
    375891: ("A table with pies being made and a person standing near a wall with pots and pans hanging on the wall.",
             ["table", "pies", "person", "wall", "pots", "pans"]),
    462380: ("A man standing in front of a bathroom mirror and a sink.", ["man", "bathroom mirror", "sink"]),
    477090: ("An airplane flies high above in the sky with telephone lines in the picture as well.",
             ["airplane", "sky", "telephone lines"]),
    537434: ("A picture of a large kitchen with white cabinets and appliances.", ["kitchen", "cabinets", "appliances"]),
    556475: ("Four people wait to cross the street at an intersection.", ["people", "street", "intersection"]),
    558725: ("People looking at a stop light on the other side of the road.", ["people", "stop light", "road"]),
    567764: ("a group of men walking across the street", ["men", "street"]),
    714851: ("A bathroom with a sink, tub, shower head and mirror.",
             ["bathroom", "sink", "tub", "shower head", "mirror"]),
    739786: ("The ten speed bike is attached to the pole.", ["ten speed bike", "pole"]),
    742733: ("Two people stand near a bike wearing helmets.", ["people", "bike", "helmets"]),
    827956: ("Someone has parked a classic orange ten speed bicycle.", ["bicycle"]),
    303: ("A gold colored pair of scissors cutting into a piece of bejeweled fabric with other bejeweled items in the "
          "background.", ["scissors", "fabric"]),
    29778: ("A dog is tied to a fire hydrant.", ["dog", "fire hydrant"]),
    154855: ("Two giraffe standing next to each other on a dirt road next to a grass field.",
             ["giraffe", "dirt road", "grass field"]),
    350327: ("A fire hydrant sits in a bed of flowers.", ["fire hydrant", "bed of flowers"]),
    527485: ("A red traffic stop sign with a blank white sign below it.", ["stop sign", "sign"]),
    536557: ("a blue pickup truck stopped at a stop sign", ["pickup truck", "stop sign"]),
    649464: ("Two trains are parked on the train tracks", ["trains", "train tracks"]),
    762813: ("A bunch of sheep in the snow behind a barbed wire fence.", ["sheep", "snow", "barbed wire fence"]),
    786416: ("An up close shot of a seagull flying in front of the beach", ["seagull", "beach"]),
    172538: ("A black and white image of two boats on the water in between two mountains.",
             ["boats", "water", "mountains"]),
    160517: ("A man stands on a fishing boat as the tide rolls in from the shore on a desolate beach.",
             ["man", "fishing boat", "tide", "shore", "beach"]),
    245799: ("a close up of a polar bear on a rock formation", ["polar bear", "rock"]),
    318722: ("Several suit cases lined in rows with luggage tags on them.", ["suit cases", "luggage tags"]),
    379709: ("A lone woman huddles under her umbrella at a picnic table in the rain.",
             ["woman", "umbrella", "picnic table"]),
    413833: ("A grass area with fallen tree logs and a black bear sitting down in the middle of the grass and wild "
             "turkey's around it.", ["grass", "tree logs", "black bear", "turkey"]),
    527671: ("A cat is laying inside of a half open lap top.", ["cat", "lap top"]),
    563116: ("A couple of parking meters on a street.", ["parking meters", "street"]),
    679108: ("There are people standing on the shore next to a body of water.", ["people", "shore", "body of water"]),
    37142: ("A half broccoli half cheese pizza that needs to be cooked.", ["broccoli", "cheese pizza"]),
    114326: ("Pears and oranges have dirt and brown spots.", ["pears", "oranges", "dirt"]),
    98846: ("A group of red, yellow and orange fruit  mixed together.", ["fruit"]),
    139764: ("THERE ARE TWO PEOPLE RIDING HORESES ON THE BEACH SHORE", ["people", "beach shore"]),
    155943: ("A cat sitting on a table next to plants and a dog outside of a sliding glass door, looking in.",
             ["cat", "table", "plants", "dog", "sliding glass door"]),
    324743: ("A green stand holding several bananas for sale.", ["stand", "bananas"]),
    326867: ("Bunch of bananas hanging in an open air market stall.", ["bananas", "market stall"]),
    401233: ("A pitcher for the Camden baseball team throws a pitch.", ["pitcher", "baseball team"]),
    807443: ("Two plates, one with a sandwich and fries, the other with just a sandwich and a pickle.",
             ["plates", "sandwich", "fries", "pickle"]),
    811628: ("a table top with some food on top of it", ["table", "food"]),
    14588: ("Young toddler sitting on toilet bowl brushing teeth.", ["toddler", "toilet bowl", "teeth"]),
    189860: ("A male tennis player reaching up to hit the ball.", ["tennis player", "ball"]),
    194720: ("a male is wearing white and playing tennis", ["male"]),
    507241: ("A newly married couple cutting up a  giant hot dog cake.", ["couple", "hot dog cake"]),
    671149: ("A table with laptops, monitor screens, keyboards, mice, phone handsets and    chairs",
             ["table", "laptops", "monitor screens", "keyboards", "mice", "phone handsets", "chairs"]),
    610740: ("A man holding a Wii game controller while standing in a living room.",
             ["man", "wii game controller", "living room"]),
    517488: ("The laptop has an mp3 player next to it.", ["laptop", "mp3 player"]),
    479887: ("There is a cream colored couch behind the oval coffee table.", ["couch", "coffee table"]),
    478054: ("THERE IS AN IMAGE OF A LIVING WITH A RUG AND AN END TABLE", ["rug", "end table"]),
    306984: ("A person wearing a towel is drying their hair with a hair dryer.",
             ["person", "towel", "hair", "hair dryer"]),
    249299: ("A patio table with two dinner plates of food and two bowls of salad.",
             ["patio table", "dinner plates", "food", "bowls", "salad"]),
    70491: ("An overview of traffic on a wet day.", []),
    105652: ("a double bus driving on a city  street", ["bus", "city street"]),
}


@pytest.fixture(scope="module")
def captions(coco_mini) -> dict[int, str]:
    data = json.loads((coco_mini / "annotations" / "captions_val2017.json").read_text())
    return {a["id"]: a["caption"].strip() for a in data["annotations"]}


@pytest.fixture(scope="module")
def tok(clip_bpe, tmp_path_factory):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path_factory.mktemp("clip-tok"), bpe_path=clip_bpe))


@pytest.mark.parametrize("ann_id", sorted(TABLE))
def test_hand_checked_coco_captions(captions, ann_id):
    caption, expected = TABLE[ann_id]
    assert captions[ann_id] == caption  # the table quotes the real sample
    assert noun_phrases(caption) == expected


def test_every_phrase_of_the_sample_is_findable_and_coverage(captions, tok):
    n_with = n_phrases = 0
    for caption in captions.values():
        phrases = noun_phrases(caption)
        n_with += bool(phrases)
        assert len({default_nouns().singular(p) for p in phrases}) == len(phrases), (caption, phrases)
        ids = tokenize_captions(tok, caption)[0]
        for phrase in phrases:
            assert phrase == phrase.lower() and phrase == " ".join(phrase.split()), phrase
            assert phrase in " ".join(caption.lower().split()), (caption, phrase)  # as written
            pos = phrase_token_positions(tok, caption, phrase)
            assert pos is not None, (caption, phrase)
            spelled = "".join(tok.convert_ids_to_tokens(ids[pos].tolist())).replace("</w>", "")
            assert spelled == phrase.replace(" ", "").replace("-", ""), (caption, phrase, spelled)
            n_phrases += 1
    assert len(captions) >= 390 and n_with / len(captions) >= 0.97
    assert n_phrases / len(captions) >= 2.5


@pytest.mark.parametrize(
    "caption, expected",
    [
        ("Three women with knives and two people with glasses", ["women", "knives", "people", "glasses"]),
        ("Two men, children and geese; mice and wolves", ["men", "children", "geese", "mice", "wolves"]),
        ("toothbrushes, buses, ponies, boxes, leaves and feet", ["toothbrushes", "buses", "ponies", "boxes",
                                                                 "leaves", "feet"]),
        ("a dish of cacti", ["dish", "cacti"]),
    ],
)
def test_plurals_are_kept_as_written(caption, expected):
    assert noun_phrases(caption) == expected


def test_compounds_and_merging():
    assert noun_phrases("Two men hold wine glasses by a hot dog stand.") == ["men", "wine glasses", "hot dog stand"]
    assert noun_phrases("chocolate spread on toast by a fire hydrant") == ["chocolate spread", "toast", "fire hydrant"]
    assert noun_phrases("a teddy bear and a bear; a hot dog and a dog") == ["teddy bear", "bear", "hot dog", "dog"]
    assert noun_phrases("a tennis racket in a bathroom sink") == ["tennis racket", "bathroom sink"]
    # adjacent nouns merge by rule, not only listed compounds; punctuation or a possessive splits them
    small = NounVocabulary({"things": ["cat", "bed", "dog", "house"]})
    assert small.phrases("a cat bed and a dog house") == ["cat bed", "dog house"]
    assert small.phrases("a cat, bed and the cat's bed") == ["cat", "bed"]
    # hyphens join: written as in the caption, deduplicated with the spaced spelling
    assert noun_phrases("a wine-glass and a Wine Glass") == ["wine-glass"]
    assert noun_phrases("A fire-hydrant, a stop sign; and a dog") == ["fire-hydrant", "stop sign", "dog"]


def test_skipped_words_and_bare_nouns():
    assert noun_phrases("A photo of a view from the top of a hill") == ["hill"]
    assert noun_phrases("the front of a bus, a side view of a car, an image of a cat") == ["bus", "car", "cat"]
    assert noun_phrases("Close-up picture of a giraffe's head") == ["giraffe", "head"]
    assert noun_phrases("A big red car and a small white dog") == ["car", "dog"]  # no adjectives or colours
    assert noun_phrases("a metal fork, a male tennis player and a baby elephant") == ["fork", "tennis player",
                                                                                      "elephant"]
    assert noun_phrases("a male and a baby") == ["male", "baby"]


def test_rules_groups_verbs_colors():
    assert noun_phrases("a group of people, a couple skiers, a herd of sheep") == ["people", "skiers", "sheep"]
    assert noun_phrases("a newly married couple") == ["couple"]
    assert noun_phrases("People stand near a green stand") == ["people", "stand"]
    assert noun_phrases("Kites fly over the beach. A fly on a cake") == ["kites", "beach", "fly", "cake"]
    assert noun_phrases("He wants to park the car in the park") == ["car", "park"]
    assert noun_phrases("a woman can drink from a can") == ["woman", "can"]
    assert noun_phrases("an orange on a table") == ["orange", "table"]
    assert noun_phrases("an orange cat eats orange fruit") == ["cat", "fruit"]
    assert noun_phrases("a gold colored pair of scissors") == ["scissors"]


def test_order_duplicates_case_and_empty():
    assert noun_phrases("A DOG, a Cat... and a dog.") == ["dog", "cat"]
    assert noun_phrases("Two giraffes and a giraffe") == ["giraffes"]  # singular key, first occurrence wins
    assert noun_phrases("a person and people; a glass and two glasses") == ["person", "glass"]
    assert noun_phrases("Men’s shoes and a dog’s bowl") == ["men", "shoes", "dog", "bowl"]
    assert noun_phrases("knife,fork") == ["knife", "fork"]
    for empty in ("", "   ", "...", "It is what it is."):
        assert noun_phrases(empty) == []


def test_vocabulary_file_format(tmp_path):
    text = "# comment\n[animals]\ndog, octopus (octopi)  # trailing comment\n[not objects]\nview\n"
    v = NounVocabulary.from_text(text)
    assert v.phrases("two octopi and a dog, a view") == ["octopi", "dog"]
    assert v.singular("octopi") == "octopus" and v.singular("dogs") == "dog"
    assert "dogs" in v and "view" not in v and len(v) == 3
    path = tmp_path / "mine.txt"
    path.write_text(text)
    assert NounVocabulary.from_file(path).fingerprint() == v.fingerprint()
    assert load_nouns(path, coco=False).fingerprint() == v.fingerprint()
    assert "skateboard" in load_nouns(path) and "skateboard" not in v  # the COCO table's terms are added
    more = v.extended(["zorb"], skip=["dog"])
    assert more.phrases("a dog in a zorb") == ["zorb"] and more.fingerprint() != v.fingerprint()
    with pytest.raises(ValueError, match=r"nouns.txt:1: an entry before"):
        NounVocabulary.from_text("dog\n[animals]\n")
    with pytest.raises(ValueError, match=r"nouns.txt:2: a section header"):
        NounVocabulary.from_text("[animals]\n[oops\n")


def test_bundled_vocabulary(test_data):
    v = default_nouns()
    assert v is default_nouns() and len(v) > 3000  # built once
    for word in ("top", "front", "side", "view", "image", "picture", "picture of"):
        assert word not in v
    coco = json.loads((test_data / "categories" / "coco80_categories.json").read_text())
    names = [c["name"] for c in coco["categories"]]
    assert len(names) == 80 and all(name in v for name in names)
    for name in names:
        assert noun_phrases(f"there is a {name} here") == [name], name
    ade = json.loads((test_data / "categories" / "ade20k_150_classes.json").read_text())["classes"]
    assert sum(c["name"] in v for c in ade) / len(ade) >= 0.95


def test_spacy_method_or_its_error():
    with pytest.raises(ValueError, match="unknown noun-phrase method 'nltk'"):
        noun_phrases("a cat", method="nltk")
    if importlib.util.find_spec("spacy") is None:
        with pytest.raises(ValueError, match=r"pip install spacy && python -m spacy download en_core_web_sm"):
            noun_phrases("A man holds a wine glass.", method="spacy")
        return
    try:
        import spacy

        spacy.load("en_core_web_sm")
    except OSError:
        with pytest.raises(ValueError, match="python -m spacy download en_core_web_sm"):
            noun_phrases("A man holds a wine glass.", method="spacy")
        return
    got = noun_phrases("A man holds a wine glass near the top of a table.", method="spacy")
    assert "man" in got and "wine glass" in got and "top" not in got
