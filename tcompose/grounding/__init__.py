"""The TokenCompose maths: grounding losses, cross-attention capture, attention-map reductions, the training
objective and the grounding score. Pure tensor code over a diffusers denoiser; no I/O, no stage, no CLI, no
knowledge of model families (they pass in what differs: :class:`.objective.UNetObjective` for the UNets).

- :mod:`.losses`: ``token_loss``, ``pixel_loss``, ``resize_mask`` (the reference's, one example and one group)
  and the batched ``grounding_losses`` the training step uses;
- :mod:`.attention`: ``capture_cross_attention`` (fp32 probabilities of the selected cross-attention layers);
- :mod:`.attention_maps`: per-word heat maps from captured maps (attnviz);
- :mod:`.objective`: ``tokencompose_losses``, L_LDM + lambda L_token + gamma L_pixel for one batch, and
  ``UNetObjective`` (DDPM training inputs, Min-SNR weights, capture) of the UNet families;
- :mod:`.joint_attention`: ``capture_joint_attention`` (image-to-text maps of SD3 / FLUX joint-attention blocks);
- :mod:`.flow_matching`: ``FlowMatchingObjective`` (SD3 / FLUX training inputs, weights, capture);
- :mod:`.score`: ``grounding_score``, the share of each noun's attention inside its mask;
- :mod:`.attend_excite`: Attend-and-Excite's loss and latent update (a sampling-time method, for comparison).
"""

from .attention import AttentionStore, capture_cross_attention, cross_attention_modules, parse_layers
from .losses import attention_in_mask, grounding_losses, pad_words, pixel_loss, reduce_over_words, resize_mask, token_loss
from .flow_matching import FlowMatchingObjective
from .joint_attention import capture_joint_attention
from .objective import UNET, UNetObjective, tokencompose_losses
from .score import grounding_score

__all__ = [
    "AttentionStore", "attention_in_mask", "capture_cross_attention", "capture_joint_attention", "cross_attention_modules",
    "FlowMatchingObjective", "UNET", "UNetObjective",
    "grounding_losses", "grounding_score", "pad_words", "parse_layers", "pixel_loss", "reduce_over_words",
    "resize_mask", "token_loss", "tokencompose_losses",
]
