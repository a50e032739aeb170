"""FID and CLIP score (``tcompose fid``): the numeric core.

- :mod:`.inception`: ``FidInceptionV3`` (TF-2015 Inception v3 pool features, torch-fidelity's weights and
  numbers, no torchvision), ``load_inception``, ``download_weights``, ``tf1_bilinear_matrix``, ``TinyFeatureNet``;
- :mod:`.frechet`: ``frechet_distance`` (pytorch-fid's formula), ``RunningStats`` (streamed mean and covariance);
- :mod:`.clip_score`: ``ClipScorer`` (torchmetrics' CLIP score, 100 * max(cos, 0)).
"""

from .clip_score import ClipScorer
from .frechet import RunningStats, fid_from_features, frechet_distance
from .inception import (WEIGHTS_URL, FidInceptionV3, TinyFeatureNet, download_weights, load_inception,
                        tf1_bilinear_matrix, weights_path)

__all__ = ["ClipScorer", "FidInceptionV3", "RunningStats", "TinyFeatureNet", "WEIGHTS_URL", "download_weights",
           "fid_from_features", "frechet_distance", "load_inception", "tf1_bilinear_matrix", "weights_path"]
