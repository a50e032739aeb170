"""What the data is: COCO-format folders, the synthetic scenes of the demo and tests, category lists, the
caption vocabulary (words -> COCO categories), noun phrases, and caption text -> CLIP and T5 token positions.

- :mod:`.coco`: ``CocoDataset`` (images, captions, instances, masks from polygons and RLE);
- :mod:`.captioned`: ``open_images``, ``CaptionedDataset`` (any captioned image set as the masks stage reads COCO);
  :mod:`.captioned_layout`: which kind of folder it is, which split, a hub dataset id's cached snapshot;
- :mod:`.synthetic`: ``make_scenes``, COCO-format scenes of coloured objects with captions and masks;
- :mod:`.categories`: COCO's 80 and ADE20K's 150 class names, MultiGen's category sets;
- :mod:`.vocab`: ``match_categories`` (resources/coco_synonyms.json);
- :mod:`.nouns`: ``noun_phrases`` (resources/nouns.txt); :mod:`.text`: ``phrase_token_positions``;
- :mod:`.token_offsets`: T5 positions from a fast tokenizer's character offsets (FLUX), SD3's CLIP + T5 sequence;
- :mod:`.clip_bpe`: CLIP-format BPE vocabularies on disk (the real one from its merge list, or a small one
  learnt from captions and resources/common_words.txt).
"""

from .categories import ADE20K_150, COCO_80
from .coco import CocoDataset, CocoError, ImageReadError
from .nouns import default_nouns, load_nouns
from .synthetic import make_scenes
from .text import noun_phrases, phrase_token_positions, phrases_token_positions, tokenize_captions
from .vocab import Vocabulary, default_vocabulary, match_categories

__all__ = [
    "ADE20K_150", "COCO_80", "CocoDataset", "CocoError", "ImageReadError", "Vocabulary", "default_nouns",
    "default_vocabulary", "load_nouns", "make_scenes", "match_categories", "noun_phrases", "phrase_token_positions",
    "phrases_token_positions", "tokenize_captions",
]
