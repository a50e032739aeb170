"""Where the masks stage gets its masks: one :class:`~tcompose.masks.interface.Source` per ``--source``.

A source is split in two, because images are decoded and preprocessed in DataLoader worker processes while
the models run in the main process:

- its **prep** (picklable, no models) runs in the workers: ``parse(image, captions)`` analyses the text of
  all of an image's captions (which phrases each has) and ``preprocess(images)`` turns a batch of decoded
  PIL images into model inputs (``needs_pixels`` False: the images are not decoded at all);
- its **grounder** runs in the main process: ``ground(items, inputs, chosen)`` returns, for each image, one
  :class:`~tcompose.masks.interface.Grounding` per chosen caption (``chosen[j]``: indices into ``items[j].captions``).

``coco-gt`` (:mod:`tcompose.masks.coco_gt`) takes COCO's instance masks of the categories the caption names (no models, no pixels);
``grounded-sam`` (:mod:`tcompose.masks.grounded_sam`) detects the caption's noun phrases with GroundingDINO and
segments the boxes with SAM / SAM-HQ. ``content(cfg)`` gives the settings of a source that decide its rows
(they go into the dataset fingerprint); ``stats`` names the counters it adds to the manifest's ``stats``.
"""

from __future__ import annotations

from .coco_gt import build as coco_gt_build
from .coco_gt import content as coco_gt_content
from .grounded_sam import build as grounded_sam_build
from .grounded_sam import content as grounded_sam_content
from .interface import Source

SOURCES: dict[str, Source] = {
    "coco-gt": Source("coco-gt", needs_instances=True, build=coco_gt_build, content=coco_gt_content,
                      no_match="no caption noun names an annotated category", uses_workers=False),
    "grounded-sam": Source("grounded-sam", needs_instances=False, build=grounded_sam_build,
                           content=grounded_sam_content, no_match="no noun phrase in the caption",
                           stats=("boxes", "phrases_no_box", "phrases_not_prompted")),
}
