"""tcompose.data.token_offsets: phrase positions from a fast T5-style tokenizer's character offsets (FLUX), and in
SD3's CLIP (77) + T5 sequence; multi-piece words, joiners, claiming, truncation."""

from __future__ import annotations

import pytest

from tcompose.data.token_offsets import offset_words, sd3_phrase_positions, t5_input_ids, t5_phrase_positions
from tcompose.testing.tiny_dit import build_tiny_t5_tokenizer


@pytest.fixture(scope="module")
def t5():
    return build_tiny_t5_tokenizer()


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from transformers import CLIPTokenizer

    from tcompose.data.clip_bpe import write_clip_tokenizer

    return CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path_factory.mktemp("clip-tok")))


def _spelled(tok, caption, positions, max_len=64):
    ids = t5_input_ids(tok, caption, max_len)[0]
    return "".join(tok.convert_ids_to_tokens(ids[positions].tolist())).replace("\u2581", "")


def test_input_ids_are_padded_as_the_pipelines_pad_them(t5):
    ids = t5_input_ids(t5, ["a cat", "a dog on a skateboard"], 16)
    assert ids.shape == (2, 16)
    assert ids[0, 2].item() == t5.eos_token_id and (ids[0, 3:] == t5.pad_token_id).all()


def test_multi_piece_words_contribute_every_piece(t5):
    caption = "An elephant and a skateboarder near the motorcycle."
    elephant, skater, motorcycle, near = t5_phrase_positions(t5, caption, ["elephant", "skateboarder", "motorcycle",
                                                                           "near"])
    assert len(elephant) == 2 and len(skater) >= 2 and len(motorcycle) == 2 and len(near) == 1
    assert _spelled(t5, caption, elephant) == "elephant"
    assert _spelled(t5, caption, skater) == "skateboarder"
    assert _spelled(t5, caption, motorcycle) == "motorcycle"
    assert elephant == sorted(elephant) and skater[0] == elephant[-1] + 3  # "and", "a" between


def test_positions_come_from_the_caption_not_the_word_encoded_alone(t5):
    caption = "Elephants by a Giraffe"
    alone = t5("giraffe", add_special_tokens=False).input_ids
    ids = t5_input_ids(t5, caption, 32)[0].tolist()
    (giraffe,) = t5_phrase_positions(t5, caption, ["giraffe"])
    assert giraffe and [ids[p] for p in giraffe] != alone  # capitalised in the caption: other pieces
    assert _spelled(t5, caption, giraffe, 32) == "Giraffe"
    assert t5_phrase_positions(t5, caption, ["elephant"]) == [None]  # whole words only: not inside "Elephants"


def test_longer_phrases_claim_first_and_repeats_take_the_next_occurrence(t5):
    caption = "a dog, a hot dog and a dog"
    dog, hot_dog, dog_again = t5_phrase_positions(t5, caption, ["dog", "hot dog", "dog"])
    words = {text: pos for _, text, pos in offset_words(t5, caption, 64) if text in ("hot",)}
    assert hot_dog[0] == words["hot"][0] and len(hot_dog) == 2
    assert dog < hot_dog < dog_again and not set(dog) & set(hot_dog) and not set(dog_again) & set(hot_dog)


def test_joining_punctuation_is_skipped_and_other_punctuation_breaks(t5):
    caption = "a wine-glass on a dog, house"
    wine_glass, dog_house = t5_phrase_positions(t5, caption, ["wine glass", "dog house"])
    assert _spelled(t5, caption, wine_glass) == "wineglass"  # the hyphen's token is not returned
    assert dog_house is None
    assert t5_phrase_positions(t5, caption, ["Wine/Glass"]) == [wine_glass]


def test_truncation_drops_cut_words(t5):
    caption = "a cat sat on the motorcycle"
    assert t5_phrase_positions(t5, caption, ["motorcycle", "cat"], max_sequence_length=7) == [None, [1]]
    assert t5_phrase_positions(t5, caption, ["motorcycle"], max_sequence_length=9)[0] is not None
    kinds = [k for k, _, _ in offset_words(t5, caption, 7)]
    assert kinds[-1] == "break" and kinds[:-1] == ["word"] * 5


def test_sd3_positions_cover_clip_then_t5(clip, t5):
    from tcompose.data.text import phrases_token_positions

    caption = "a skateboarder next to a hot dog and a dog"
    phrases = ["dog", "hot dog", "skateboarder"]
    clip_pos = phrases_token_positions(clip, caption, phrases)
    t5_pos = t5_phrase_positions(t5, caption, phrases, 32)
    both = sd3_phrase_positions(clip, t5, caption, phrases, max_sequence_length=32)
    for b, c, t in zip(both, clip_pos, t5_pos):
        assert b == c + [77 + p for p in t] and max(c) < 77
    assert sd3_phrase_positions(clip, t5, caption, phrases, 32, which="clip") == clip_pos
    assert sd3_phrase_positions(clip, t5, caption, phrases, 32, which="t5") == [[77 + p for p in t] for t in t5_pos]
    with pytest.raises(ValueError, match="which"):
        sd3_phrase_positions(clip, t5, caption, phrases, which="pooled")


def test_sd3_keeps_the_t5_positions_of_a_phrase_past_clips_77_tokens(clip, t5):
    caption = " ".join(["a red cat"] * 30) + " and a giraffe"
    (giraffe,) = sd3_phrase_positions(clip, t5, caption, ["giraffe"], max_sequence_length=256)
    assert giraffe and min(giraffe) >= 77  # cut from CLIP's 77 tokens, kept in T5's 256
    assert sd3_phrase_positions(clip, t5, caption, ["giraffe"], 256, which="clip") == [None]
