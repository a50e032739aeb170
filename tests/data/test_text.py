"""tcompose.data.text: phrase -> CLIP token positions, on the real CLIP vocabulary and real COCO captions."""

from __future__ import annotations

import json
import re

import pytest
import torch

from tcompose.data.text import phrase_token_positions, tokenize_captions, word_positions
from tcompose.data.clip_bpe import write_clip_tokenizer


@pytest.fixture(scope="module")
def tok(clip_bpe, tmp_path_factory):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path_factory.mktemp("clip-tok"), bpe_path=clip_bpe))


def _spelled(tok, caption: str, positions: list[int]) -> str:
    ids = tokenize_captions(tok, caption)[0]
    return "".join(tok.convert_ids_to_tokens(ids[positions].tolist())).replace("</w>", "")


def test_tokenize_captions(tok):
    ids = tokenize_captions(tok, ["a photo of a cat", "two dogs"])
    assert ids.shape == (2, 77) and ids.dtype == torch.long
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (ids[0, 7:] == tok.pad_token_id).all()
    assert tokenize_captions(tok, "a photo of a cat").shape == (1, 77)


def test_positions_on_real_coco_captions(tok, coco_mini):
    data = json.loads((coco_mini / "annotations" / "captions_val2017.json").read_text())
    captions = [a["caption"].strip() for a in data["annotations"]]
    captions = [c for c in captions if c.isascii()][:150]
    assert len(captions) >= 100
    checked = multi = repeated = 0
    for caption in captions:
        lower = caption.lower()
        seen: set[str] = set()
        for m in re.finditer(r"(?<![a-z'])[a-z]+(?![a-z])", lower):
            word = m.group()
            if word in seen:
                continue
            seen.add(word)
            pos = phrase_token_positions(tok, caption, word)
            assert pos is not None, (caption, word)
            assert _spelled(tok, caption, pos) == word, (caption, word, pos)
            # first whole-word occurrence: exactly after the tokens of the text before it (and <start>)
            before = len(tok(caption[: m.start()], add_special_tokens=False).input_ids)
            assert pos == list(range(1 + before, 1 + before + len(pos))), (caption, word, pos)
            repeated += lower.count(f" {word} ") > 1
            multi += len(pos) > 1
            checked += 1
    assert checked > 1000 and multi >= 5 and repeated >= 5


def test_multi_token_words_and_phrases(tok):
    caption = "A skateboarder rides past a giraffe and a fire hydrant."
    pos = phrase_token_positions(tok, caption, "skateboarder")
    assert pos == [2, 3] and _spelled(tok, caption, pos) == "skateboarder"
    pos = phrase_token_positions(tok, caption, "fire hydrant")
    assert pos == [10, 11, 12] and _spelled(tok, caption, pos) == "firehydrant"  # fire</w> hydr ant</w>
    assert phrase_token_positions(tok, caption, "hydrant") == [11, 12]


def test_case_and_punctuation_insensitive(tok):
    base = phrase_token_positions(tok, "A wine glass on a table.", "wine glass")
    assert base == [2, 3]
    assert phrase_token_positions(tok, "A wine glass on a table.", "Wine-Glass") == base
    assert phrase_token_positions(tok, "A WINE GLASS on a table.", "wine glass!") == base
    hyphen = phrase_token_positions(tok, "A Wine-glass on a table.", "wine glass")
    assert hyphen == [2, 4]  # the hyphen's token (3) is not part of the phrase
    assert tok.convert_ids_to_tokens(tokenize_captions(tok, "A Wine-glass")[0, 3:4].tolist()) == ["-</w>"]
    assert phrase_token_positions(tok, "Table, with a cat.", "CAT") == [5]
    # clause punctuation ends a match; spelling differences are not bridged
    assert phrase_token_positions(tok, "a bottle of wine, glass and plate", "wine glass") is None
    assert phrase_token_positions(tok, "a wineglass", "wine glass") is None


def test_whole_words_only_and_first_occurrence(tok):
    assert phrase_token_positions(tok, "Someone tries to catch the cats in a catalog", "cat") is None
    assert phrase_token_positions(tok, "a cat tries to catch a cat", "cat") == [2]
    caption = "a dog chases a cat and a dog"
    assert phrase_token_positions(tok, caption, "dog") == [2]
    assert phrase_token_positions(tok, caption, "a dog") == [1, 2]
    assert phrase_token_positions(tok, "the man's hat", "man") == [2]
    assert phrase_token_positions(tok, "the man's hat", "man's hat") == [2, 3, 4]


def test_absent_and_truncated(tok):
    assert phrase_token_positions(tok, "a photo of a cat", "zebra") is None
    assert phrase_token_positions(tok, "a photo of a cat", "") is None
    assert phrase_token_positions(tok, "a photo of a cat", " ... ") is None
    assert phrase_token_positions(tok, "dog " * 80 + "cat", "cat") is None
    # 75 content tokens fit between <start> and <end>: a two-token word at 74-75 fits, at 75-76 is cut
    assert phrase_token_positions(tok, "dog " * 73 + "skateboarder", "skateboarder") == [74, 75]
    assert phrase_token_positions(tok, "dog " * 74 + "skateboarder", "skateboarder") is None
    assert phrase_token_positions(tok, "dog " * 74 + "cat", "cat") == [75]


def test_word_positions(tok):
    assert word_positions(tok, "A Wine-glass, and 2 cats!") == [
        ("a", [1]), ("wine", [2]), ("-", [3]), ("glass", [4]), (",", [5]), ("and", [6]), ("2", [7]),
        ("cats", [8]), ("!", [9]),
    ]


def test_small_trained_tokenizer(tmp_path):
    from transformers import CLIPTokenizer

    small = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path, corpus=["a red cube next to a blue sphere"]))
    caption = "A red cube next to a blue sphere and a xylophone"
    assert phrase_token_positions(small, caption, "blue sphere") == [7, 8]
    pos = phrase_token_positions(small, caption, "xylophone")
    assert len(pos) > 1 and _spelled(small, caption, pos) == "xylophone"


def test_phrases_claim_their_tokens_longest_first(tok):
    from tcompose.data.text import phrases_token_positions

    caption = "A hot dog and a dog on a plate"
    hot_dog, dog, plate = phrases_token_positions(tok, caption, ["hot dog", "dog", "plate"])
    assert _spelled(tok, caption, hot_dog) == "hotdog" and _spelled(tok, caption, dog) == "dog"  # pieces joined
    assert dog[0] > hot_dog[-1]  # the second "dog", not the one inside "hot dog"
    assert phrase_token_positions(tok, caption, "dog") == hot_dog[-1:]  # alone, the first occurrence
    # order of the list does not matter, and a phrase whose every occurrence is taken gets None
    assert phrases_token_positions(tok, caption, ["dog", "hot dog"]) == [dog, hot_dog]
    assert phrases_token_positions(tok, "a hot dog", ["dog", "hot dog"])[0] is None
    # a repeated phrase takes the next occurrence
    first, second = phrases_token_positions(tok, "a dog chases a dog", ["dog", "dog"])
    assert first < second
    assert phrase_token_positions(tok, caption, "dog", taken=set(hot_dog)) == dog
