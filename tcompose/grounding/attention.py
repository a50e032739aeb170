"""Capture the cross-attention probabilities of chosen UNet layers, with gradients.

    with capture_cross_attention(unet, layers=("mid", "up")) as store:
        noise_pred = unet(latents, t, encoder_hidden_states=emb).sample
    store.maps["up_16"]  # list of [B, heads, HW, T] float32 tensors, one per cross-attention layer

Group names are ``f"{block}_{side}"``: block in down/mid/up, side the attention map's spatial side at the
current input (SD1.4 at 512 px: mid_8, up_16, up_32, up_64; ``{h}x{w}`` for non-square inputs). ``layers``
takes block names, group names, or both.

Only the selected cross-attention layers compute explicit probabilities (softmax in float32, also under
bf16/fp16 autocast); the layer's output is computed from those same probabilities, so there is no second
attention pass. Every other attention layer keeps its processor (diffusers' fused SDPA path). On exit the
UNet's original processor objects are back.

Gradient checkpointing: diffusers recomputes checkpointed blocks during backward. The maps kept are those
of the forward pass itself (autograd recomputes what they need); recomputation does not add maps, because
the store only records while the UNet's own ``forward`` is running. Call ``backward`` inside the ``with``
block: the recomputation must see the same processors as the forward pass.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch

from ..io.errors import UserError

BLOCKS = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}


@dataclass
class AttentionStore:
    """Cross-attention maps of the latest UNet forward pass, by group name."""

    maps: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    latent_hw: tuple[int, int] | None = None
    recording: bool = False

    def clear(self) -> None:
        self.maps = {}

    def group_name(self, block: str, hw: int) -> str:
        if self.latent_hw is not None:
            h0, w0 = self.latent_hw
            f = math.sqrt(h0 * w0 / hw)
            h, w = round(h0 / f), round(w0 / f)
            if h * w == hw:
                return f"{block}_{h}" if h == w else f"{block}_{h}x{w}"
        return f"{block}_{math.isqrt(hw)}"


def parse_layers(layers: Iterable[str]) -> tuple[set[str], set[str]]:
    """Split a layer selection into block names and group names; unknown names raise ValueError."""
    blocks, groups = set(), set()
    for name in layers:
        if name in BLOCKS.values():
            blocks.add(name)
        elif name.split("_")[0] in BLOCKS.values() and "_" in name:
            groups.add(name)
        else:
            raise UserError(f"--layers {name!r}: unknown layer selection; use down, mid, up or a group like up_16")
    return blocks, groups


class CapturingCrossAttnProcessor:
    """Cross-attention that computes probabilities explicitly (float32) and records them in a store."""

    def __init__(self, store: AttentionStore, block: str, groups: set[str] | None, fallback):
        self.store = store
        self.block = block
        self.groups = groups  # None: every group of this block
        self.fallback = fallback

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if hidden_states.ndim == 4:
            hw = hidden_states.shape[2] * hidden_states.shape[3]
        else:
            hw = hidden_states.shape[1]
        group = self.store.group_name(self.block, hw)
        if self.groups is not None and group not in self.groups:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        with torch.autocast(device_type=query.device.type, enabled=False):
            # scaling the query (HW x d) is cheaper than scaling the scores (HW x T) in forward and backward
            scores = torch.matmul(query.float() * attn.scale, key.float().transpose(-1, -2))
            if attention_mask is not None:
                mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch)
                scores = scores + mask.view(batch, attn.heads, -1, mask.shape[-1]).float()
            probs = scores.softmax(dim=-1)  # [B, heads, HW, T]
            out = torch.matmul(probs, value.float())
        if self.store.recording:
            self.store.maps.setdefault(group, []).append(probs)

        out = out.to(query.dtype).transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def cross_attention_modules(unet) -> Iterator[tuple[str, str, torch.nn.Module]]:
    """(module name, block, module) of every cross-attention layer of a diffusers UNet, in forward order."""
    for name, module in unet.named_modules():
        if getattr(module, "is_cross_attention", False) and hasattr(module, "set_processor"):
            block = BLOCKS.get(name.split(".")[0])
            if block is not None:
                yield name, block, module


@contextmanager
def capture_cross_attention(unet, layers: Iterable[str] = ("mid", "up")) -> Iterator[AttentionStore]:
    """Record the selected cross-attention maps of every ``unet`` forward pass made inside the block."""
    blocks, groups = parse_layers(tuple(layers))
    store = AttentionStore()
    originals = []
    for _, block, module in cross_attention_modules(unet):
        if block not in blocks and not any(g.startswith(block + "_") for g in groups):
            continue
        original = module.get_processor()
        only = None if block in blocks else {g for g in groups if g.startswith(block + "_")}
        originals.append((module, original))
        module.set_processor(CapturingCrossAttnProcessor(store, block, only, original))
    if not originals:
        raise UserError(f"no cross-attention layer of this UNet matches layers={tuple(layers)}")

    def pre_hook(_module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        store.clear()
        store.latent_hw = tuple(sample.shape[-2:])
        store.recording = True

    def post_hook(_module, _args, _kwargs, _output):
        store.recording = False

    handles = [
        unet.register_forward_pre_hook(pre_hook, with_kwargs=True),
        unet.register_forward_hook(post_hook, with_kwargs=True, always_call=True),
    ]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()
        for module, original in originals:
            module.set_processor(original)
        store.recording = False


def stack_group(maps: list[torch.Tensor]) -> torch.Tensor:
    """Maps of one group ``L x [B, H, HW, T]`` as ``[B, L, H, HW, T]`` (for inspection and plotting)."""
    return torch.stack(maps, dim=1)


def average_maps(store: AttentionStore) -> dict[str, torch.Tensor]:
    """Per group, the maps averaged over layers and heads, reshaped square: ``[B, side, side, T]``."""
    out = {}
    for group, maps in store.maps.items():
        m = stack_group(maps).mean(dim=(1, 2))
        side = math.isqrt(m.shape[1])
        if side * side == m.shape[1]:
            out[group] = m.reshape(m.shape[0], side, side, m.shape[-1])
    return out



def _on_meta(x):
    """A tensor, or a (nested) dict of them, as zeros of the same shapes on the meta device."""
    if isinstance(x, dict):
        return {k: _on_meta(v) for k, v in x.items()}
    return torch.zeros(x.shape, dtype=x.dtype, device="meta")


def attention_groups(unet_or_config, latent_hw: tuple[int, int], conditioning: dict | None = None) -> dict[str, int]:
    """The cross-attention groups of a UNet at a latent size, with their number of maps: ``{"mid_8": 1, ...}``.

    A shapes-only forward pass: the UNet is rebuilt from its config on the meta device (no memory, no weights,
    well under a second even for SDXL), and hooks read each cross-attention layer's input size. Group names are
    those :func:`capture_cross_attention` gives, in forward order. ``conditioning``: the UNet's keyword arguments
    of one example (only their shapes count; the model family's ``example_conditioning``), by default 77 text
    embeddings of the UNet's ``cross_attention_dim``.
    """
    from diffusers import UNet2DConditionModel

    config = getattr(unet_or_config, "config", unet_or_config)
    with torch.device("meta"):
        meta_unet = UNet2DConditionModel.from_config(config)
    store = AttentionStore(latent_hw=tuple(latent_hw))
    counts: dict[str, int] = {}

    def pre_hook(block):
        def hook(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            hw = hidden.shape[2] * hidden.shape[3] if hidden.ndim == 4 else hidden.shape[1]
            group = store.group_name(block, hw)
            counts[group] = counts.get(group, 0) + 1
        return hook

    handles = [m.register_forward_pre_hook(pre_hook(block), with_kwargs=True)
               for _, block, m in cross_attention_modules(meta_unet)]
    try:
        config = meta_unet.config
        cross = config.cross_attention_dim
        cross = cross[0] if isinstance(cross, (list, tuple)) else cross
        h, w = latent_hw
        kwargs = _on_meta(conditioning if conditioning is not None
                          else {"encoder_hidden_states": torch.zeros(1, 77, cross)})
        with torch.no_grad():
            meta_unet(torch.zeros(1, config.in_channels, h, w, device="meta"), torch.zeros(1, device="meta"), **kwargs)
    finally:
        for h in handles:
            h.remove()
    return counts


def describe_groups(groups: dict[str, int]) -> str:
    """``"mid_8 (1 map), up_16 (3 maps)"``."""
    return ", ".join(f"{g} ({n} map{'s' if n != 1 else ''})" for g, n in groups.items())


def resolve_layers(layers: Iterable[str], groups: dict[str, int], where: str = "") -> dict[str, int]:
    """The groups of ``groups`` (see :func:`attention_groups`) that a ``--layers`` selection picks, in forward
    order; ValueError naming the selection and listing the model's groups when a name picks none."""
    blocks, names = parse_layers(tuple(layers))
    unknown = [n for n in layers if (n in blocks and not any(g.startswith(n + "_") for g in groups))
               or (n in names and n not in groups)]
    if unknown or not groups:
        have = describe_groups(groups) or "none"
        raise UserError(f"--layers {','.join(unknown or layers)}: this UNet has no such cross-attention "
                        f"{'group' if len(unknown) == 1 else 'groups'}{where}; its groups are {have}")
    return {g: n for g, n in groups.items() if g in names or g.split("_")[0] in blocks}
