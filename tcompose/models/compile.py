"""Regional ``torch.compile`` of a diffusers UNet, shared by ``tcompose train-unet --compile`` and ``tcompose bench``.

    n = compile_regions(unet)      # every ResnetBlock2D and FeedForward compiles on its first call
    ...                            # train: the attention layers stay eager
    uncompile_regions(unet)        # back to eager (before evaluating or saving)

Why regions and not the whole UNet: the grounding losses capture cross-attention maps by swapping the
attention processors of the supervised layers on every step (:mod:`tcompose.grounding.attention`); a whole-model graph
would be invalidated each time. ResNet blocks and feed-forwards never see the processors, so their graphs
compile once per input shape and are reused. ``module.compile()`` compiles in place: parameter names, the
state dict and ``save_pretrained`` stay as they are.

Cost: compiling happens on the first forward/backward of each region (each distinct block shape is its own
graph; SD1.4 has more than dynamo's default recompile limit of 8, raised here to 64). On the 2-core CPU VM
with an empty inductor cache the tiny UNet took ~100 s and one FeedForward ~20 s (~6 s for the tiny UNet with
a warm cache in ``/tmp/torchinductor_$USER``); on a GPU, minutes for SD1.4. Eager and compiled steps agree
within float tolerance (the tiny UNet's losses were equal to printing precision, gradients within 1e-7).
"""

from __future__ import annotations

import torch


def _regions():
    from diffusers.models.attention import FeedForward
    from diffusers.models.resnet import ResnetBlock2D

    return ResnetBlock2D, FeedForward


def compile_regions(model: torch.nn.Module, **compile_kwargs) -> int:
    """``torch.compile`` each ResNet block and feed-forward of ``model`` in place (regional compilation);
    attention stays eager. ``compile_kwargs`` go to ``Module.compile`` (e.g. ``mode="max-autotune"``).
    Returns the number of compiled modules."""
    import torch._dynamo

    # Each block shape (channels, side) compiles its own graph: SD1.4 has more than dynamo's default limit of 8.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
    n = 0
    for module in model.modules():
        if isinstance(module, _regions()):
            module.compile(**compile_kwargs)
            n += 1
    return n


def uncompile_regions(model: torch.nn.Module) -> int:
    """Undo :func:`compile_regions` (and any in-place ``Module.compile``): the modules run eager again.
    Returns the number of modules reset."""
    n = 0
    for module in model.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None
            n += 1
    return n


def compiled_regions(model: torch.nn.Module) -> int:
    """How many submodules of ``model`` are compiled in place."""
    return sum(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())
