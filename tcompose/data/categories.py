"""Category names of the datasets the MultiGen prompt sets draw from, as constants.

- :data:`COCO_80`: the 80 COCO 2017 instance ("thing") categories, in the official order (ids 1..90 with
  gaps; position = the contiguous label index detectors use). TokenCompose's COCO prompt set
  (``coco_obj_comp_5_1k.json``) uses exactly these 80 names.
- :data:`COCO_SUPERCATEGORIES`: those 80 under COCO's 12 supercategories (vehicle, animal, food, ...).
- :data:`ADE20K_150`: the 150 classes of ADE20K SceneParsing (ADEChallengeData2016), in id order (id = position
  + 1), under the short names mmsegmentation uses (the first synonym of each class, except id 90
  "television receiver").
- :data:`ADE20K_OBJECTS`: the 100 of those 150 that TokenCompose's ADE20K prompt set
  (``ade20k_obj_comp_5_1k.json``) draws from: the countable objects (ADE20K's instance classes). The other
  50 are stuff and scene parts (wall, sky, floor, tree, grass, road, ...) that the set never names.

:data:`MULTIGEN_CATEGORIES` maps a ``--dataset`` name to the list that ``tcompose multigen --sample-seed``
samples new prompts from, so sampled prompts name the same kind of objects as the paper's sets.
"""

from __future__ import annotations

COCO_80: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)

#: The 12 COCO supercategories, each with its categories in COCO_80's order (the official ``supercategory``
#: field of instances_val2017.json); train-clip's eval chart groups categories by them.
COCO_SUPERCATEGORIES: dict[str, tuple[str, ...]] = {
    "person": ("person",),
    "vehicle": ("bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat"),
    "outdoor": ("traffic light", "fire hydrant", "stop sign", "parking meter", "bench"),
    "animal": ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe"),
    "accessory": ("backpack", "umbrella", "handbag", "tie", "suitcase"),
    "sports": ("frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard",
               "surfboard", "tennis racket"),
    "kitchen": ("bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl"),
    "food": ("banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake"),
    "furniture": ("chair", "couch", "potted plant", "bed", "dining table", "toilet"),
    "electronic": ("tv", "laptop", "mouse", "remote", "keyboard", "cell phone"),
    "appliance": ("microwave", "oven", "toaster", "sink", "refrigerator"),
    "indoor": ("book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush"),
}

ADE20K_150: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace",
    "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow", "screen door",
    "stairway",
    "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine",
    "hovel",
    "bus", "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool",
    "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball",
    "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)

#: ADE20K_150 names that are not in :data:`ADE20K_OBJECTS` (stuff, scene parts, and a few classes the
#: instance split leaves out, e.g. tree, plant, rock, blanket).
_ADE20K_NOT_OBJECTS = frozenset({
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "grass", "sidewalk", "earth", "mountain",
    "plant", "water", "house", "sea", "rug", "field", "rock", "base", "sand", "skyscraper", "grandstand", "path",
    "runway", "stairway", "river", "bridge", "blind", "hill", "bar", "hovel", "tower", "dirt track", "land",
    "escalator", "buffet", "poster", "stage", "conveyer belt", "canopy", "swimming pool", "waterfall", "tent",
    "cradle", "tank", "lake", "blanket", "pier", "crt screen", "shower",
})

ADE20K_OBJECTS: tuple[str, ...] = tuple(n for n in ADE20K_150 if n not in _ADE20K_NOT_OBJECTS)

#: ``--dataset`` -> the category names MultiGen prompts of that dataset are drawn from.
MULTIGEN_CATEGORIES: dict[str, tuple[str, ...]] = {"coco": COCO_80, "ade20k": ADE20K_OBJECTS}

assert len(COCO_80) == 80 and len(set(COCO_80)) == 80
assert len(ADE20K_150) == 150 and len(set(ADE20K_150)) == 150
assert len(ADE20K_OBJECTS) == 100 and _ADE20K_NOT_OBJECTS <= set(ADE20K_150)
