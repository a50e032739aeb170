"""Which parts of CLIP learn in train-clip: tower locking, weight-decay groups, activation checkpointing.

    lock_towers(model, lock_vision=True, lock_text=False)            # requires_grad per tower / layer
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay=0.1), ...)
"""

from __future__ import annotations

import torch

from ..io.errors import UserError

LOGIT_SCALE_MAX = 4.605170185988092  # ln(100): CLIP clamps the learnt temperature at 1/100


def lock_towers(model, lock_vision: bool = False, lock_text: bool = False, unlocked_text_layers: int = 0,
                learn_temperature: bool = True) -> dict[str, int]:
    """Set ``requires_grad``: ``lock_vision`` freezes the vision tower and its projection; ``lock_text`` the text
    tower and its projection, except (``unlocked_text_layers`` N > 0) the last N transformer layers, the final
    layer norm and the text projection. ``learn_temperature`` False freezes ``logit_scale``. Returns counts."""
    layers = model.text_model.encoder.layers
    if unlocked_text_layers and not lock_text:
        raise UserError("--unlocked-text-layers only applies with --lock-text")
    if not 0 <= unlocked_text_layers <= len(layers):
        raise UserError(f"--unlocked-text-layers must be in [0, {len(layers)}] (the text tower's layers), got {unlocked_text_layers}")
    model.requires_grad_(True)
    if lock_vision:
        model.vision_model.requires_grad_(False)
        model.visual_projection.requires_grad_(False)
    if lock_text:
        model.text_model.requires_grad_(False)
        model.text_projection.requires_grad_(False)
        if unlocked_text_layers:
            for layer in layers[len(layers) - unlocked_text_layers:]:
                layer.requires_grad_(True)
            model.text_model.final_layer_norm.requires_grad_(True)
            model.text_projection.requires_grad_(True)
    model.logit_scale.requires_grad_(learn_temperature)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable == 0:
        raise UserError("nothing left to train: every tower is locked and the temperature is fixed")
    return {"trainable": trainable, "frozen": sum(p.numel() for p in model.parameters() if not p.requires_grad)}


def no_decay(name: str, param: torch.Tensor) -> bool:
    """Parameters spared from weight decay: norms, biases, logit_scale, class embedding (all < 2-D), and the
    token and position embedding tables. Weight matrices, incl. the patch projection, decay."""
    return param.ndim < 2 or name.endswith(("token_embedding.weight", "position_embedding.weight"))


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups of the trainable parameters: with ``weight_decay`` and without (see :func:`no_decay`)."""
    decay, plain = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (plain if no_decay(name, p) else decay).append(p)
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}) if g["params"]]


def enable_checkpointing(model) -> None:
    """Recompute transformer layers in backward (non-reentrant, so frozen inputs need no ``requires_grad``)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "disable_input_require_grads"):
        try:
            model.disable_input_require_grads()  # not needed without reentrant checkpointing
        except AttributeError:
            pass
