"""Joint-attention capture on tiny SD3.5-layout and FLUX.1-dev-layout transformers: same output as without capture,
the captured slice equal to an explicit float64 computation in each processor's concatenation order, gradients with
checkpointing, processors restored, block names and per-model defaults; the tiny pipelines load from disk and draw."""

from __future__ import annotations

import copy

import pytest
import torch

from tcompose.grounding.attention import average_maps
from tcompose.grounding.joint_attention import (
    KNOWN_MODELS, capture_joint_attention, default_joint_layers, describe_blocks, joint_attention_groups,
    joint_attention_modules, known_joint_model, parse_joint_layers, resolve_joint_layers,
)
from tcompose.grounding.losses import grounding_losses, pad_words
from tcompose.testing.tiny_dit import (
    FLUX_DEV, SD3_MEDIUM, SD35_LARGE, SD35_MEDIUM, TINY_FLUX, TINY_SD35, build_tiny_flux_transformer,
    build_tiny_sd3_transformer,
)

T_TEXT = 12


def sd3_inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 4, 16, 16, generator=g),
                encoder_hidden_states=torch.randn(batch, T_TEXT, TINY_SD35["joint_attention_dim"], generator=g),
                pooled_projections=torch.randn(batch, TINY_SD35["pooled_projection_dim"], generator=g),
                timestep=torch.tensor([100.0, 700.0][:batch]))


def flux_inputs(batch=2, seed=0, side=8):
    g = torch.Generator().manual_seed(seed)
    rows, cols = torch.meshgrid(torch.arange(side * 1.0), torch.arange(side * 1.0), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    return dict(hidden_states=torch.randn(batch, side * side, TINY_FLUX["in_channels"], generator=g),
                encoder_hidden_states=torch.randn(batch, T_TEXT, TINY_FLUX["joint_attention_dim"], generator=g),
                pooled_projections=torch.randn(batch, TINY_FLUX["pooled_projection_dim"], generator=g),
                timestep=torch.tensor([0.1, 0.7][:batch]), img_ids=img_ids, txt_ids=torch.zeros(T_TEXT, 3),
                guidance=torch.full((batch,), 3.5))


MODELS = {"sd3": (build_tiny_sd3_transformer, sd3_inputs), "flux": (build_tiny_flux_transformer, flux_inputs)}


@pytest.fixture(scope="module")
def models():
    return {name: build(seed=0).eval() for name, (build, _) in MODELS.items()}


# -- output unchanged, processors back ----------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["text", "joint"])
@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_capture_leaves_the_output_unchanged_and_restores_the_processors(models, name, norm):
    model, inputs = models[name], MODELS[name][1]()
    before = dict(model.attn_processors)
    layers = ("joint",) if name == "sd3" else ("double", "single")
    with torch.no_grad():
        plain = model(**inputs).sample
        with capture_joint_attention(model, layers, norm=norm) as store:
            captured = model(**inputs).sample
    assert (captured - plain).abs().max().item() <= 1e-5
    assert list(store.maps) == list(joint_attention_groups(model))  # every block, in forward order
    assert store.latent_hw == (8, 8) and store.text_length == T_TEXT
    heads = model.config.num_attention_heads
    for maps in store.maps.values():
        assert len(maps) == 1 and maps[0].shape == (2, heads, 64, T_TEXT) and maps[0].dtype == torch.float32
        sums = maps[0].sum(-1)
        if norm == "text":
            torch.testing.assert_close(sums, torch.ones_like(sums))
        else:  # the joint softmax's text share: positive, below 1
            assert (sums > 0).all() and (sums < 1).all()
    after = model.attn_processors
    assert set(after) == set(before) and all(after[k] is v for k, v in before.items())


def test_only_the_selected_blocks_are_replaced_and_an_error_restores_them(models):
    model = models["flux"]
    before = {g: m.get_processor() for g, _, m in joint_attention_modules(model)}
    with pytest.raises(RuntimeError, match="boom"):
        with capture_joint_attention(model, "double_1,single_0-1"):
            replaced = {g for g, _, m in joint_attention_modules(model) if m.get_processor() is not before[g]}
            raise RuntimeError("boom")
    assert replaced == {"double_1", "single_0", "single_1"}
    assert all(m.get_processor() is before[g] for g, _, m in joint_attention_modules(model))
    # SD3.5's image-only second attention (dual-attention blocks) keeps its processor
    sd3 = models["sd3"]
    with capture_joint_attention(sd3, ("joint_0",)):
        assert type(sd3.transformer_blocks[0].attn2.get_processor()).__name__ == "JointAttnProcessor2_0"
        assert type(sd3.transformer_blocks[0].attn.get_processor()).__name__ == "CapturingJointAttnProcessor"


def test_maps_are_fp32_under_bf16_autocast(models):
    model = models["sd3"]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with capture_joint_attention(model, ("joint_1",)) as store:
            model(**sd3_inputs())
    assert store.maps["joint_1"][0].dtype == torch.float32
    assert average_maps(store)["joint_1"].shape == (2, 8, 8, T_TEXT)


@pytest.mark.parametrize("name,overrides,layers", [("flux", {}, "double_1,single_0"),
                                                    ("sd3", {"dual_attention_layers": (), "qk_norm": None}, "joint")])
def test_fused_projections_give_the_same_maps(name, overrides, layers):
    build, make_inputs = MODELS[name]
    model = build(seed=0, **overrides).eval()
    with torch.no_grad(), capture_joint_attention(model, layers, norm="joint") as plain:
        model(**make_inputs())
    model.fuse_qkv_projections()
    with torch.no_grad(), capture_joint_attention(model, layers, norm="joint") as fused:
        model(**make_inputs())
    for group, maps in plain.maps.items():
        torch.testing.assert_close(fused.maps[group][0], maps[0], rtol=1e-5, atol=1e-6)


def test_fused_projections_are_refused_where_diffusers_drops_the_qk_norm():
    model = build_tiny_sd3_transformer(seed=0, dual_attention_layers=())  # diffusers' fused SD3.5 path needs this
    model.fuse_qkv_projections()
    with pytest.raises(ValueError, match="unfuse_qkv_projections"):
        with capture_joint_attention(model, "joint_1"):
            pass
    assert type(model.transformer_blocks[1].attn.get_processor()).__name__ == "FusedJointAttnProcessor2_0"


# -- the slice against an explicit computation --------------------------------------------------------------------


def _rms(x, norm):
    if norm is None:
        return x
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)
    return y * norm.weight.double() if getattr(norm, "weight", None) is not None else y


def _rope(x, cos, sin):
    """Rotate each (even, odd) channel pair of ``x [B, S, H, D]`` by the angle whose cos / sin are given per
    position and channel (``[S, D]``, equal within a pair): FLUX's rotary embedding, written out."""
    even, odd = x[..., 0::2], x[..., 1::2]
    c, s = cos[:, None, 0::2].double(), sin[:, None, 0::2].double()
    out = torch.empty_like(x)
    out[..., 0::2] = even * c - odd * s
    out[..., 1::2] = odd * c + even * s
    return out


def _reference(attn, kind, inputs, output):
    """Full joint attention in float64 in the processor's own order; checks that it reproduces the block's image
    output (so the order is the processor's), returns (image->text slice of the joint softmax, text-only softmax)."""
    a = copy.deepcopy(attn).double()
    hs = inputs["hidden_states"].double()
    heads = a.heads

    def split(x):
        return x.unflatten(-1, (heads, -1))

    if kind == "single":
        n_text = inputs["text_length"]
        q = _rms(split(a.to_q(hs)), a.norm_q)
        k = _rms(split(a.to_k(hs)), a.norm_k)
        v = split(a.to_v(hs))
    else:
        ehs = inputs["encoder_hidden_states"].double()
        n_text = ehs.shape[1]
        qi, ki, vi = _rms(split(a.to_q(hs)), a.norm_q), _rms(split(a.to_k(hs)), a.norm_k), split(a.to_v(hs))
        qt = _rms(split(a.add_q_proj(ehs)), a.norm_added_q)
        kt = _rms(split(a.add_k_proj(ehs)), a.norm_added_k)
        vt = split(a.add_v_proj(ehs))
        if kind == "joint":  # SD3: [image | text]
            q, k, v = torch.cat([qi, qt], 1), torch.cat([ki, kt], 1), torch.cat([vi, vt], 1)
        else:  # FLUX double: [text | image]
            q, k, v = torch.cat([qt, qi], 1), torch.cat([kt, ki], 1), torch.cat([vt, vi], 1)
    if inputs.get("image_rotary_emb") is not None:
        cos, sin = inputs["image_rotary_emb"]
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    probs = scores.softmax(-1)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v).flatten(2)
    n_image = hs.shape[1] - (n_text if kind == "single" else 0)
    image_rows = slice(0, n_image) if kind == "joint" else slice(n_text, n_text + n_image)
    text_cols = slice(n_image, n_image + n_text) if kind == "joint" else slice(0, n_text)
    image_out = out[:, image_rows]
    if kind != "single":
        image_out = a.to_out[0](image_out)
    got = output[0] if isinstance(output, tuple) else output
    got = got if kind != "single" else got[:, n_text:]
    torch.testing.assert_close(image_out, got.double(), rtol=1e-5, atol=1e-5)  # the order is the processor's
    joint_slice = probs[:, :, image_rows, text_cols]
    text_only = scores[:, :, image_rows, text_cols].softmax(-1)
    return joint_slice, text_only


@pytest.mark.parametrize("name,group,kind", [("sd3", "joint_2", "joint"), ("sd3", "joint_3", "joint"),
                                             ("flux", "double_1", "double"), ("flux", "single_1", "single")])
@pytest.mark.parametrize("norm", ["text", "joint"])
def test_captured_slice_equals_an_explicit_float64_computation(models, name, group, kind, norm):
    model, inputs = models[name], MODELS[name][1]()
    attn = next(m for g, _, m in joint_attention_modules(model) if g == group)
    seen = {}

    def pre(_m, args, kwargs):
        seen["inputs"] = {**dict(zip(("hidden_states", "encoder_hidden_states"), args)), **kwargs}

    def post(_m, _args, _kwargs, output):
        seen["output"] = output

    handles = [attn.register_forward_pre_hook(pre, with_kwargs=True),
               attn.register_forward_hook(post, with_kwargs=True)]
    try:
        with torch.no_grad(), capture_joint_attention(model, (group,), norm=norm, chunk_bytes=4096) as store:
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    block_inputs = {**seen["inputs"], "text_length": T_TEXT}
    joint_slice, text_only = _reference(attn, kind, block_inputs, seen["output"])
    expected = text_only if norm == "text" else joint_slice
    torch.testing.assert_close(store.maps[group][0].double(), expected, rtol=1e-4, atol=1e-6)


# -- gradients ------------------------------------------------------------------------------------------------------


def _grads(name, checkpointing, norm, layers):
    build, make_inputs = MODELS[name]
    model = build(seed=0)
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    index, valid = pad_words([[[1], [2, 3]], [[4]]])
    g = torch.Generator().manual_seed(1)
    with capture_joint_attention(model, layers, norm=norm) as store:
        out = model(**make_inputs()).sample
        loss = out.pow(2).mean()
        for maps in store.maps.values():
            masks = (torch.rand(2, 2, maps[0].shape[2], generator=g) > 0.5).float()
            tok, pix = grounding_losses(maps, masks, index, valid)
            loss = loss + tok.sum() + pix.sum()
        loss.backward()
    counts = {k: len(v) for k, v in store.maps.items()}
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, counts


@pytest.mark.parametrize("name,layers,norm,key", [
    ("sd3", ("joint_1", "joint_2"), "text", "transformer_blocks.1.attn.add_k_proj.weight"),
    ("flux", ("double_1", "single_0"), "joint", "single_transformer_blocks.0.attn.to_q.weight"),
])
def test_gradients_reach_the_maps_with_gradient_checkpointing(name, layers, norm, key):
    plain, n_plain = _grads(name, False, norm, layers)
    ckpt, n_ckpt = _grads(name, True, norm, layers)
    assert n_plain == n_ckpt == {layer: 1 for layer in layers}  # recomputation in backward added no maps
    assert plain[key].abs().sum() > 0
    assert set(plain) == set(ckpt)
    for param in plain:
        torch.testing.assert_close(ckpt[param], plain[param], rtol=1e-4, atol=1e-6)


# -- names and defaults ------------------------------------------------------------------------------------------


def test_layer_values_parse_into_block_names():
    assert parse_joint_layers("joint_4-6") == ["joint_4", "joint_5", "joint_6"]
    assert parse_joint_layers(["double_11,double_12", "single_3", "double_12"]) == [
        "double_11", "double_12", "single_3"]
    assert parse_joint_layers(" double , single_0-1 ") == ["double", "single_0", "single_1"]
    for bad in ("up_16", "joint_", "joint_9-4", "double-3", "single_a"):
        with pytest.raises(ValueError, match="--layers"):
            parse_joint_layers(bad)


def test_resolve_keeps_forward_order_and_lists_the_blocks_on_a_miss():
    groups = joint_attention_groups(TINY_FLUX)
    assert list(groups) == ["double_0", "double_1", "double_2", "single_0", "single_1"]
    assert list(resolve_joint_layers("single_1,double_2", groups)) == ["double_2", "single_1"]
    assert list(resolve_joint_layers("single", groups)) == ["single_0", "single_1"]
    with pytest.raises(ValueError, match=r"double_7.*its blocks are double_0-2, single_0-1"):
        resolve_joint_layers("double_7", groups)
    with pytest.raises(ValueError, match="joint"):
        resolve_joint_layers("joint_0", groups)
    assert describe_blocks(joint_attention_groups(FLUX_DEV)) == "double_0-18, single_0-37"


def test_default_layers_of_the_known_models_and_the_middle_third_otherwise():
    def ids(layers):
        return [int(n.split("_")[1]) for n in layers]

    assert known_joint_model(SD3_MEDIUM) == "SD3-medium" and ids(default_joint_layers(SD3_MEDIUM)) == [4, 5, 7, 8, 9]
    assert known_joint_model(SD35_MEDIUM) == "SD3.5-medium"
    assert ids(default_joint_layers(SD35_MEDIUM)) == [5, 7, 8, 9, 10]
    assert known_joint_model(SD35_LARGE) == "SD3.5-large"
    assert ids(default_joint_layers(SD35_LARGE)) == [16, 18, 20, 21, 24]
    assert known_joint_model(FLUX_DEV) == "FLUX.1"
    assert default_joint_layers(FLUX_DEV) == ("double_11", "double_12", "double_14", "double_17", "double_18")
    assert len(KNOWN_MODELS) == 4
    # other depths: the middle third of the joint / double blocks
    assert known_joint_model(TINY_SD35) is None and default_joint_layers(TINY_SD35) == ("joint_1", "joint_2")
    assert default_joint_layers(TINY_FLUX) == ("double_1",)
    assert default_joint_layers({**SD3_MEDIUM, "num_layers": 12}) == tuple(f"joint_{i}" for i in range(4, 8))
    assert known_joint_model({**FLUX_DEV, "num_single_layers": 20}) is None


def test_capture_refuses_an_unknown_norm_and_block(models):
    with pytest.raises(ValueError, match="attention-norm"):
        with capture_joint_attention(models["sd3"], norm="pixel"):
            pass
    with pytest.raises(ValueError, match="its blocks are joint_0-3"):
        with capture_joint_attention(models["sd3"], "double_1"):
            pass


# -- the tiny pipelines -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_the_tiny_pipelines_load_from_disk_and_draw(tmp_path, family):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    from tcompose.testing.tiny_dit import write_tiny_flux_pipeline, write_tiny_sd3_pipeline

    write, cls = (write_tiny_sd3_pipeline, StableDiffusion3Pipeline) if family == "sd3" else \
        (write_tiny_flux_pipeline, FluxPipeline)
    folder = write(tmp_path / family)
    pipe = cls.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    t5 = pipe.tokenizer_3 if family == "sd3" else pipe.tokenizer_2
    assert t5.is_fast and len(t5("a skateboarder").input_ids) > 3  # "skateboarder" is several pieces
    if family == "sd3":
        cfg = pipe.transformer.config
        assert cfg.qk_norm == "rms_norm" and tuple(cfg.dual_attention_layers) == (0, 1)
    else:
        assert pipe.transformer.config.guidance_embeds
    with capture_joint_attention(pipe.transformer) as store:
        images = pipe("a cat next to a skateboarder", num_inference_steps=2, height=32, width=32,
                      max_sequence_length=16, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (1, 32, 32, 3) and float(images.min()) >= 0 and float(images.max()) <= 1
    text = 77 + 16 if family == "sd3" else 16
    assert list(store.maps) == list(default_joint_layers(pipe.transformer))
    assert store.latent_hw == (8, 8) and all(m[0].shape[-2:] == (64, text) for m in store.maps.values())
    with pytest.raises(FileExistsError):
        write(tmp_path / family)
