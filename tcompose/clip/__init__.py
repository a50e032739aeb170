"""``tcompose train-clip``: contrastive (InfoNCE) finetuning of CLIP on object crops.

- :mod:`.config`: ``TrainClipConfig``; :mod:`.loop`: ``run``; :mod:`.data`: crops -> examples, the held-out split;
- :mod:`.loss`: ``info_nce`` (CLIP's symmetric loss, optionally label-deduplicated) and its multi-process form;
- :mod:`.towers`: locking, weight-decay groups, checkpointing; :mod:`.eval`: zero-shot and retrieval metrics.
"""

from .config import TrainClipConfig
from .loop import run
from .loss import distributed_info_nce, gather_with_grad, info_nce, info_nce_local
from .towers import lock_towers, param_groups

__all__ = ["TrainClipConfig", "distributed_info_nce", "gather_with_grad", "info_nce", "info_nce_local", "lock_towers",
           "param_groups", "run"]
