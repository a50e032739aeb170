"""Capture the image-to-text attention of chosen joint-attention blocks of a diffusion transformer, with gradients.

    with capture_joint_attention(transformer, layers=("joint_7",)) as store:     # SD3 / SD3.5
        pred = transformer(latents, encoder_hidden_states=emb, pooled_projections=pooled, timestep=t).sample
    store.maps["joint_7"]  # [Tensor [B, heads, HW, T]], float32: image query -> text key probabilities

    with capture_joint_attention(flux, layers=parse_joint_layers("double_11-12,single_3")) as store: ...

In an MMDiT block the text and image tokens attend jointly, over one sequence; the TokenCompose map of a noun is
the attention of each image query to that noun's text keys. diffusers concatenates the two streams in different
orders (diffusers 0.42):

- SD3 / SD3.5 (``SD3Transformer2DModel``; ``JointTransformerBlock.attn`` with ``JointAttnProcessor2_0``,
  models/attention_processor.py): ``query = cat([query, encoder_query], dim=2)``: ``[image | text]``; the image
  queries are rows ``[0, HW)``, the text keys columns ``[HW, HW + T)``. No rotary embedding; RMS qk-norm
  (``norm_q``, ``norm_added_k``) where the model has ``qk_norm`` (SD3.5). The second, image-only attention of
  SD3.5's dual-attention blocks (``attn2``) has no text and is never captured.
- FLUX.1 double-stream blocks (``FluxTransformerBlock.attn`` with ``FluxAttnProcessor``,
  models/transformers/transformer_flux.py): ``cat([encoder_query, query], dim=1)``: ``[text | image]``, the text
  keys columns ``[0, T)``, the image queries rows ``[T, T + HW)``; RMS qk-norm on each stream, then the rotary
  embedding of ``ids = cat((txt_ids, img_ids))`` over the joint sequence, so its first ``T`` rows belong to the text.
- FLUX.1 single-stream blocks (``FluxSingleTransformerBlock``): the block itself concatenates
  ``cat([encoder_hidden_states, hidden_states], dim=1)`` (``[text | image]``) before its attention, which sees one
  sequence; ``T`` is the transformer's ``encoder_hidden_states`` length, read when its forward starts.

Group names are one per block: ``joint_{i}`` (SD3), ``double_{i}`` and ``single_{i}`` (FLUX), ``i`` the block's
index in ``transformer_blocks`` / ``single_transformer_blocks``; each group holds one map per forward pass.
``--layers`` values name blocks, ranges (``joint_4-9``), lists (``double_11,double_12``) or all blocks of a kind
(``double``): :func:`parse_joint_layers`. The map grid is the patch grid: latent side / patch size for SD3, the
packed 2 x 2 grid of ``img_ids`` for FLUX (``store.latent_hw``).

Only the selected blocks compute image-to-text scores, and only ``q_img . k_txt`` (``[B, heads, HW, T]``), in
float32 (autocast off), from the block's own projections, qk-norms and rotary embedding applied as its processor
applies them. The block's output is its original processor's (diffusers' attention dispatch, unchanged), so the
transformer's output with capture equals the output without it; the cost is a second projection of the image
queries and text keys of the selected blocks.

Normalisation (``norm``):

- ``"text"`` (default): a softmax over the text keys only, so each image position's text attention sums to 1, as
  in UNet cross-attention. The token loss (a word's share of attention inside its mask) and the pixel loss (BCE of
  a word's summed probability against its mask) mean what they mean for the UNets, and the paper's lambda and gamma
  are the starting point.
- ``"joint"``: the slice of the joint softmax over all ``T + HW`` keys: ``exp(s - logsumexp(all scores of the
  row))``. Rows sum to the share of attention an image position gives the text (usually well below 1, the rest
  going to image tokens). The token loss is a ratio and hardly changes scale; the pixel loss's target of 1 inside
  a mask now asks those image positions to attend to the noun rather than to the image, so it pulls harder and
  means something else: lower gamma (or read the term as a push, not a probability match). The log-sum-exp over
  the ``HW`` image keys is computed explicitly in chunks of query rows (``chunk_bytes`` of float32 scores at a
  time), each chunk under activation checkpointing, so neither the forward nor the saved activations hold more
  than one ``rows x HW`` block per head (the whole ``HW x HW`` matrix is 4,608^2 per head for FLUX at 1024 px);
  the price is one extra ``HW x HW`` score pass in the forward and one in the backward. (SDPA computes the same
  log-sum-exp but does not return it through a public API.)

Gradient checkpointing: as for :func:`tcompose.grounding.attention.capture_cross_attention`, the store records only
while the transformer's own ``forward`` runs, so the recomputation during backward adds no maps; the capturing
processor computes its maps on every call, so the recomputation saves the same tensors as the forward. Call
``backward`` inside the ``with`` block. Keyword arguments of ``joint_attention_kwargs`` other than
``image_rotary_emb`` (IP-Adapter inputs) do not reach a captured block's processor; an attention mask is refused.
Fused QKV projections (``fuse_qkv_projections``) are captured as the unfused ones; on SD3.5 they are refused, since
diffusers' ``FusedJointAttnProcessor2_0`` leaves out the qk-norm (so the fused model attends otherwise than the
model as trained).

Default layers (:func:`default_joint_layers`), from the published ranking of blocks by agreement with Grounded-SAM
masks, recognised from the transformer's config by its depth (:func:`known_joint_model`): SD3-medium (24 joint
blocks, no dual attention) 4,5,7,8,9; SD3.5-medium (24 blocks, dual attention) 5,7,8,9,10; SD3.5-large (38 blocks)
16,18,20,21,24; FLUX.1 (19 double + 38 single blocks; dev and schnell share the architecture) double 11,12,14,17,18.
Any other depth: the middle third of its joint / double blocks (``[n // 3, n - n // 3)``).
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch

from ..io.errors import UserError
from .attention import AttentionStore

KINDS = ("joint", "double", "single")
NORMS = ("text", "joint")
#: Where the text sits in the joint sequence of each kind of block (see the module docstring).
ORDER = {"joint": ("image", "text"), "double": ("text", "image"), "single": ("text", "image")}
_NAME = re.compile(rf"^({'|'.join(KINDS)})(?:_(\d+)(?:-(\d+))?)?$")

#: (name, number of joint/double blocks, number of single blocks, dual attention or None for either, layers)
KNOWN_MODELS: tuple[tuple[str, int, int, bool | None, tuple[str, ...]], ...] = (
    ("SD3-medium", 24, 0, False, tuple(f"joint_{i}" for i in (4, 5, 7, 8, 9))),
    ("SD3.5-medium", 24, 0, True, tuple(f"joint_{i}" for i in (5, 7, 8, 9, 10))),
    ("SD3.5-large", 38, 0, None, tuple(f"joint_{i}" for i in (16, 18, 20, 21, 24))),
    ("FLUX.1", 19, 38, None, tuple(f"double_{i}" for i in (11, 12, 14, 17, 18))),
)


@dataclass
class JointAttentionStore(AttentionStore):
    """Image-to-text attention maps of the latest transformer forward pass, by block name. ``latent_hw`` is the
    patch grid (the maps' ``HW``), ``text_length`` the number of text tokens ``T``."""

    text_length: int | None = None


# -- blocks and their names ---------------------------------------------------------------------------------------


def _config(transformer_or_config: Any) -> dict:
    return dict(getattr(transformer_or_config, "config", transformer_or_config))


def is_two_stream(config: Any) -> bool:
    """Whether a transformer (or its config) has FLUX's double- and single-stream blocks (else SD3's joint blocks)."""
    return "num_single_layers" in _config(config)


def joint_attention_groups(transformer_or_config: Any) -> dict[str, int]:
    """Every capturable block of a transformer, in forward order, with its number of maps per forward (one):
    ``{"joint_0": 1, ...}`` or ``{"double_0": 1, ..., "single_0": 1, ...}``; from the config alone."""
    config = _config(transformer_or_config)
    if is_two_stream(config):
        names = [f"double_{i}" for i in range(config["num_layers"])]
        names += [f"single_{i}" for i in range(config["num_single_layers"])]
    else:
        names = [f"joint_{i}" for i in range(config["num_layers"])]
    return {n: 1 for n in names}


def joint_attention_modules(transformer) -> Iterator[tuple[str, str, torch.nn.Module]]:
    """(group name, kind, attention module) of every joint-attention block of an SD3 or FLUX transformer."""
    if hasattr(transformer, "single_transformer_blocks"):
        for i, block in enumerate(transformer.transformer_blocks):
            yield f"double_{i}", "double", block.attn
        for i, block in enumerate(transformer.single_transformer_blocks):
            yield f"single_{i}", "single", block.attn
    else:
        for i, block in enumerate(transformer.transformer_blocks):
            yield f"joint_{i}", "joint", block.attn


def describe_blocks(names: Iterable[str]) -> str:
    """Block names with runs folded into ranges: ``"double_0-18, single_0-37"``."""
    runs: list[list] = []  # [kind, first, last]
    for name in names:
        kind, _, index = name.partition("_")
        i = int(index)
        if runs and runs[-1][0] == kind and runs[-1][2] == i - 1:
            runs[-1][2] = i
        else:
            runs.append([kind, i, i])
    return ", ".join(f"{k}_{a}" if a == b else f"{k}_{a}-{b}" for k, a, b in runs)


def parse_joint_layers(values: str | Iterable[str]) -> list[str]:
    """``--layers`` values -> block names and kinds, ranges expanded, duplicates dropped, in the order given.

    Each value is a comma-separated list of ``joint_7``, ``double_11``, ``single_3``, inclusive ranges
    (``joint_4-9``) or a kind alone (``double``: every block of that kind). UserError for anything else."""
    if isinstance(values, str):
        values = [values]
    out: list[str] = []
    for value in values:
        for item in (s.strip() for s in str(value).split(",")):
            if not item:
                continue
            m = _NAME.match(item)
            if m is None or (m.group(3) is not None and int(m.group(3)) < int(m.group(2))):
                raise UserError(f"--layers {item!r}: name a transformer block such as joint_7, double_11 or single_3, "
                                "a range such as joint_4-9, or joint / double / single for every block of that kind")
            kind, first, last = m.groups()
            if first is None:
                names = [kind]
            else:
                names = [f"{kind}_{i}" for i in range(int(first), int(last if last is not None else first) + 1)]
            out.extend(n for n in names if n not in out)
    return out


def resolve_joint_layers(layers: str | Iterable[str], groups: dict[str, int], where: str = "") -> dict[str, int]:
    """The blocks of ``groups`` (:func:`joint_attention_groups`) a ``--layers`` selection picks, in forward order;
    UserError naming what matches nothing and listing the transformer's blocks."""
    names = parse_joint_layers(layers)
    unknown = [n for n in names if (n not in groups if "_" in n else not any(g.startswith(n + "_") for g in groups))]
    if unknown or not names:
        have = describe_blocks(groups) or "none"
        asked = ",".join(unknown or names) or "(empty)"
        raise UserError(f"--layers {asked}: this transformer has no such block{where}; its blocks are {have}")
    return {g: n for g, n in groups.items() if g in names or g.split("_")[0] in names}


def known_joint_model(transformer_or_config: Any) -> str | None:
    """The published model a transformer's config has the depth of ("SD3.5-medium", "FLUX.1", ...), or None.

    Recognised by depth alone, as the per-model defaults are rankings of blocks by index: ``num_layers`` (and
    ``num_single_layers`` for FLUX), with ``dual_attention_layers`` telling SD3.5-medium (dual attention in blocks
    0-12) from SD3-medium (none); widths do not count, so a random model of the same depth gets the same default."""
    config = _config(transformer_or_config)
    depth = config.get("num_layers")
    singles = config.get("num_single_layers", 0) if is_two_stream(config) else 0
    dual = bool(config.get("dual_attention_layers") or ())
    for name, n, n_single, has_dual, _ in KNOWN_MODELS:
        if depth == n and singles == n_single and (has_dual is None or has_dual == dual) \
                and (n_single > 0) == is_two_stream(config):
            return name
    return None


def default_joint_layers(transformer_or_config: Any) -> tuple[str, ...]:
    """The blocks captured when ``--layers`` is not given: a known model's published choice
    (:data:`KNOWN_MODELS`), else the middle third of the joint (SD3) or double-stream (FLUX) blocks."""
    name = known_joint_model(transformer_or_config)
    for known, *_, layers in KNOWN_MODELS:
        if known == name:
            return layers
    config = _config(transformer_or_config)
    n = int(config["num_layers"])
    kind = "double" if is_two_stream(config) else "joint"
    return tuple(f"{kind}_{i}" for i in range(n // 3, n - n // 3))


# -- the scores -------------------------------------------------------------------------------------------------


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, S, heads * D] -> [B, S, heads, D]``."""
    return x.unflatten(-1, (heads, x.shape[-1] // heads))


def _project(attn, x: torch.Tensor, which: str, added: bool) -> torch.Tensor:
    """One of the block's q / k projections of ``x`` (``[B, S, heads, D]``), fused or not, with its qk-norm."""
    index = "qkv".index(which)
    if getattr(attn, "fused_projections", False):
        fused = attn.to_added_qkv if added else attn.to_qkv
        y = fused(x).chunk(3, dim=-1)[index]
    else:
        y = getattr(attn, f"add_{which}_proj" if added else f"to_{which}")(x)
    y = _heads(y, attn.heads)
    norm = getattr(attn, f"norm_added_{which}" if added else f"norm_{which}", None)
    return norm(y) if norm is not None else y


def _rope(x: torch.Tensor, freqs, rows: slice) -> torch.Tensor:
    """diffusers' own rotary embedding of ``x [B, S, heads, D]`` with the rows ``rows`` of the joint sequence's
    ``(cos, sin)``; ``freqs`` None: ``x`` unchanged (SD3)."""
    if freqs is None:
        return x
    from diffusers.models.embeddings import apply_rotary_emb

    cos, sin = freqs
    return apply_rotary_emb(x, (cos[rows], sin[rows]), sequence_dim=1)


def _scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``[B, Q, heads, D] x [B, K, heads, D] -> [B, heads, Q, K]``."""
    return torch.einsum("bqhd,bkhd->bhqk", q, k)


def _lse(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return _scores(q, k).logsumexp(dim=-1)


def chunked_logsumexp(q: torch.Tensor, k: torch.Tensor, chunk_bytes: int = 1 << 28) -> torch.Tensor:
    """``logsumexp`` over keys of ``q . k`` (``[B, Q, heads, D]``, ``[B, K, heads, D]`` -> ``[B, heads, Q]``), a
    block of query rows at a time (at most ``chunk_bytes`` of float32 scores), each block recomputed in backward
    (activation checkpointing) rather than kept."""
    from torch.utils.checkpoint import checkpoint

    b, n_q, h, _ = q.shape
    rows = max(1, chunk_bytes // (4 * b * h * k.shape[1]))
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    parts = [checkpoint(_lse, q[:, i:i + rows], k, use_reentrant=False) if grad else _lse(q[:, i:i + rows], k)
             for i in range(0, n_q, rows)]
    return torch.cat(parts, dim=-1)


def image_to_text_probs(attn, kind: str, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                        text_length: int | None, image_rotary_emb=None, norm: str = "text",
                        chunk_bytes: int = 1 << 28) -> torch.Tensor:
    """Image-query-to-text-key attention probabilities ``[B, heads, HW, T]`` (float32) of one block's attention
    called with these inputs, as its processor would see them (see the module docstring)."""
    if kind == "single":
        if text_length is None:
            raise RuntimeError("a single-stream block's text length is unknown: capture from the transformer's forward")
        text, image = hidden_states[:, :text_length], hidden_states[:, text_length:]
        added = False
    else:
        text, image = encoder_hidden_states, hidden_states
        added = True
    n_text = text.shape[1]
    text_rows, image_rows = (slice(0, n_text), slice(n_text, None)) if ORDER[kind][0] == "text" else (None, None)
    if image_rotary_emb is not None and text_rows is None:
        raise RuntimeError(f"a rotary embedding reached a {kind} block, whose processor applies none")
    q_img = _rope(_project(attn, image, "q", False), image_rotary_emb, image_rows)
    k_txt = _rope(_project(attn, text, "k", added), image_rotary_emb, text_rows)
    k_img = _rope(_project(attn, image, "k", False), image_rotary_emb, image_rows) if norm == "joint" else None
    with torch.autocast(device_type=q_img.device.type, enabled=False):
        q = q_img.float() * (q_img.shape[-1] ** -0.5)  # SDPA's default scale, as both processors use it
        scores = _scores(q, k_txt.float())
        if norm == "text":
            return scores.softmax(dim=-1)
        lse = torch.logaddexp(scores.logsumexp(dim=-1), chunked_logsumexp(q, k_img.float(), chunk_bytes))
        return (scores - lse.unsqueeze(-1)).exp()


class CapturingJointAttnProcessor:
    """Computes one block's image-to-text probabilities into a store, then runs the block's own processor."""

    def __init__(self, store: JointAttentionStore, group: str, kind: str, fallback, norm: str, chunk_bytes: int):
        self.store, self.group, self.kind, self.fallback = store, group, kind, fallback
        self.norm, self.chunk_bytes = norm, chunk_bytes

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 **kwargs):
        if attention_mask is not None:
            raise UserError(f"attention capture in {self.group}: the transformer was called with an attention mask, "
                            "which capture does not take")
        probs = image_to_text_probs(attn, self.kind, hidden_states, encoder_hidden_states, self.store.text_length,
                                    image_rotary_emb, self.norm, self.chunk_bytes)
        if self.store.recording:
            self.store.maps.setdefault(self.group, []).append(probs)
        if image_rotary_emb is None:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, **kwargs)


def _grid(args: tuple, kwargs: dict, config: dict) -> tuple[int, int] | None:
    """The patch grid of a transformer forward's image input: SD3 ``[B, C, H, W]`` latents / patch size; FLUX the
    rows and columns of ``img_ids`` (``[HW, 3]``: 0, row, column)."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    if hidden is not None and hidden.ndim == 4:
        p = config.get("patch_size", 1)
        return hidden.shape[-2] // p, hidden.shape[-1] // p
    ids = kwargs.get("img_ids")
    if ids is None or hidden is None:
        return None
    ids = ids[0] if ids.ndim == 3 else ids
    h = int(ids[:, 1].max() - ids[:, 1].min()) + 1
    w = int(ids[:, 2].max() - ids[:, 2].min()) + 1
    return (h, w) if h * w == hidden.shape[1] else None


@contextmanager
def capture_joint_attention(transformer, layers: str | Iterable[str] | None = None, norm: str = "text",
                            chunk_bytes: int = 1 << 28) -> Iterator[JointAttentionStore]:
    """Record the image-to-text attention of the selected blocks in every ``transformer`` forward pass made inside
    the block. ``layers``: ``--layers`` values (:func:`parse_joint_layers`), default :func:`default_joint_layers`;
    ``norm``: ``"text"`` or ``"joint"``. The original processors are back on exit."""
    if norm not in NORMS:
        raise UserError(f"--attention-norm {norm!r}: choose one of {', '.join(NORMS)}")
    config = dict(transformer.config)
    groups = joint_attention_groups(config)
    selected = resolve_joint_layers(default_joint_layers(config) if layers is None else layers, groups)
    store = JointAttentionStore()
    originals = []
    try:
        for group, kind, module in joint_attention_modules(transformer):
            if group in selected:
                if kind == "joint" and getattr(module, "fused_projections", False) and module.norm_q is not None:
                    raise UserError(f"attention capture in {group}: this SD3 transformer has fused QKV projections, "
                                    "and diffusers' fused joint processor skips its qk-norm, so its attention is not "
                                    "the model's; call transformer.unfuse_qkv_projections() first")
                original = module.get_processor()
                originals.append((module, original))
                module.set_processor(CapturingJointAttnProcessor(store, group, kind, original, norm, chunk_bytes))

        def pre_hook(_module, args, kwargs):
            store.clear()
            text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
            store.text_length = None if text is None else text.shape[1]
            store.latent_hw = _grid(args, kwargs, config)
            store.recording = True

        def post_hook(_module, _args, _kwargs, _output):
            store.recording = False

        handles = [transformer.register_forward_pre_hook(pre_hook, with_kwargs=True),
                   transformer.register_forward_hook(post_hook, with_kwargs=True, always_call=True)]
        try:
            yield store
        finally:
            for h in handles:
                h.remove()
    finally:
        for module, original in originals:
            module.set_processor(original)
        store.recording = False

