"""The masks stage (``tcompose masks``): captioned images -> one segmentation mask per caption noun phrase.

- :mod:`.stage`: ``run``; :mod:`.config`: ``MasksConfig``;
- :mod:`.sources`: ``SOURCES`` (:mod:`.coco_gt`: COCO's instance masks; :mod:`.grounded_sam`: GroundingDINO
  boxes (:mod:`.grounding_dino`) -> SAM / SAM-HQ masks (:mod:`.segment`)), on the interface of :mod:`.interface`;
- :mod:`.loader`: images decoded and preprocessed in worker processes; :mod:`.rows`: an image's rows;
  :mod:`.caption_choice`: ``--captions first|all|clip-best``;
- :mod:`.import_tokencompose`: the original TokenCompose data -> a masks dataset.
"""

from .config import MasksConfig
from .import_tokencompose import ImportConfig
from .import_tokencompose import run as import_tokencompose
from .interface import Grounding, Source
from .sources import SOURCES
from .stage import STATS_KEYS, run, summary_line

__all__ = ["SOURCES", "STATS_KEYS", "Grounding", "ImportConfig", "MasksConfig", "Source", "import_tokencompose", "run",
           "summary_line"]
