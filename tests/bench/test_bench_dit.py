"""`tcompose bench --sections sd3,flux`: the diffusion transformers' training step (plain vs the grounding losses,
LoRA on bf16 / nf4 bases, full finetuning), rows skipped by byte count, and the byte counts themselves against a
recount of real tensors (tiny models, quantized and stepped on CPU) and of meta-built real-size models."""

from __future__ import annotations

import math

import pytest
import torch

from tcompose.bench import dit
from tcompose.bench.memory import adam8bit_bytes, dit_sizes, nf4_bytes, transformer_memory


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def test_quick_transformer_sections(quick_report):
    """The quick run's sd3 / flux rows (the whole quick bench, shared with test_bench.py: tests/bench/conftest.py)."""
    report = quick_report
    assert report["errors"] == [] and {"sd3_lora4_bf16", "sd3_full", "flux_lora4_nf4", "flux_lora4_bf16",
                                        "flux_full"} <= set(report["section_s"])
    sd3, flux = report["sd3"], report["flux"]
    assert [(r["size"], r["lora_rank"], r["base"], r["optimizer"], r["gradient_checkpointing"]) for r in sd3] == [
        ("tiny-sd35", 4, "fp32", "adamw8bit", False), ("tiny-sd35", 4, "fp32", "adamw8bit", True),
        ("tiny-sd35", None, None, "adamw", False), ("tiny-sd35", None, None, "adamw", True)]
    assert [(r["lora_rank"], r["base"]) for r in flux] == [(4, "nf4")] * 2 + [(4, "fp32")] * 2 + [(None, None)] * 2
    for r in sd3 + flux:
        assert r["batch_size"] == 1 and r["latent_size"] == 16 and r["text_len"] == (93 if r in sd3 else 32)
        for key in ("step_s_plain", "step_s_tc", "overhead_ratio", "images_per_s", "peak_mem_mb", "mfu",
                    "flops_per_step_tc", "flops_per_step_plain", "bytes_before_activations", "params_m"):
            assert _positive(r[key]), (key, r[key])
        assert r["images_per_s"] == pytest.approx(1 / r["step_s_tc"], rel=1e-2)
        # the losses were computed on captured maps of the family's default blocks, and they cost FLOPs
        assert r["token_loss"] > 0 and r["pixel_loss"] > 0
        assert r["flops_per_step_tc"] > r["flops_per_step_plain"]
        assert r["layers"] == (["joint_1", "joint_2"] if r in sd3 else ["double_1"])
        assert (r["trainable_params_m"] < r["params_m"] / 5) == bool(r["lora_rank"])
    # the byte counts of the real models are in the report, whatever the mode
    sizes = [(m["size"], m["lora_rank"], m["base"]) for m in report["memory_bytes"]]
    assert ("sd35-medium", 16, "bf16") in sizes and ("flux-dev", 16, "nf4") in sizes and ("flux-dev", None, None) in sizes
    status = {t["name"]: t["status"] for t in report["targets"]}
    assert status["peak_mem_mb_flux_lora_nf4_ckpt_run"] == "not measured"  # tiny models say nothing of it


def test_the_grounding_losses_differ_from_the_plain_step():
    """One tc step and one plain step from the same weights and batch: the tc step's token and pixel losses are
    positive and its gradients differ; the plain step's grounding terms are zero."""
    from tcompose.bench.train import PLAIN, TC, TrainStep
    from tcompose.models.families import family_named

    family = family_named("flux")
    config = dit_sizes()["tiny-flux"][1]
    grads = {}
    for name, weights in (("plain", PLAIN), ("tc", TC)):
        model = dit.build_dit("tiny-flux", torch.device("cpu"), torch.float32)
        objective = family.configure_objective(dict(config), {})
        step = TrainStep(model, 2, 16, "fp32", torch.device("cpu"), layers=("double_1",), family=family,
                         objective=objective, scheduler=dit.flow_scheduler("flux"), text_len=32)
        step.opt.step = lambda: None  # keep the gradients
        step.opt.zero_grad = lambda set_to_none=True: None
        losses = step(weights)
        grads[name] = torch.cat([p.grad.flatten() for p in model.parameters()])
        if name == "plain":
            assert float(losses["token"]) == 0 and float(losses["pixel"]) == 0
        else:
            assert float(losses["token"].detach()) > 0 and float(losses["pixel"].detach()) > 0
            assert float(losses["total"].detach()) > float(losses["ldm"].detach())
    assert not torch.allclose(grads["plain"], grads["tc"])


def test_a_row_that_cannot_fit_is_skipped_with_its_byte_count(monkeypatch):
    monkeypatch.setattr(dit, "free_bytes", lambda device: 10_000)
    rows = dit.bench_dit("tiny-flux", 16, 32, lora_rank=4, base="nf4", optimizer="adamw8bit")
    assert len(rows) == 1 and "step_s_tc" not in rows[0]
    assert "needs 0.0 GB before activations" in rows[0]["skipped"] and "cpu has 0.0 GB free" in rows[0]["skipped"]
    # the nf4 row's bytes are the quantized base's, as train-unet quantizes it layer by layer onto the device
    assert rows[0]["bytes_before_activations"] == transformer_memory(
        "tiny-flux", 4, "nf4", "adamw8bit", "fp32", frozen_parts=False)["transformer_bytes"]


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def test_byte_counts_equal_the_tensors_of_a_quantized_lora_model():
    """tiny FLUX, nf4 base in bf16, LoRA r4, 8-bit AdamW after one step: the bytes of the real tensors (4-bit
    weights with their block scales, the adapters, their gradients, the optimizer's state) equal the count."""
    from tcompose.bench.train import TrainStep
    from tcompose.models.families import family_named
    from tcompose.models.lora import add_lora
    from tcompose.models.quantize import quantize_linear_layers

    family = family_named("flux")
    model = dit.build_dit("tiny-flux", torch.device("cpu"), torch.bfloat16)
    quantize_linear_layers(model, "nf4", torch.bfloat16, "cpu")
    add_lora(model, 4, targets=family.lora_targets)
    weights = 0
    for p in model.parameters():
        weights += _tensor_bytes(p.data)
        state = getattr(p, "quant_state", None)
        if state is not None:  # double quantization: uint8 block scales, their float32 scales, the offset
            weights += _tensor_bytes(state.absmax) + _tensor_bytes(state.state2.absmax) + _tensor_bytes(state.offset)
    weights += sum(_tensor_bytes(b) for b in model.buffers() if b.is_floating_point())
    count = transformer_memory("tiny-flux", 4, "nf4", "adamw8bit", "bf16", frozen_parts=False)
    assert weights == count["weights_bytes"]

    step = TrainStep(model, 1, 16, "bf16", torch.device("cpu"), layers=("double_1",), family=family,
                     objective=family.configure_objective(dict(model.config), {}),
                     scheduler=dit.flow_scheduler("flux"), text_len=32, optimizer="adamw8bit")
    step.opt.zero_grad = lambda set_to_none=True: None  # keep the gradients to count them
    step({"lambda_token": 1e-3, "gamma_pixel": 5e-5})
    trained = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trained) == count["trainable_parameters"]
    assert sum(_tensor_bytes(p.grad) for p in trained) == count["gradients_bytes"]
    state = sum(_tensor_bytes(v) for p in trained for k, v in step.opt.state[p].items()
                if torch.is_tensor(v) and not k.startswith("qmap"))  # qmaps: one shared lookup table
    assert state == count["optimizer_bytes"]


def test_the_8bit_and_4bit_formulas_on_tensors_past_their_thresholds():
    """Tensors large enough for 8-bit AdamW state and several nf4 scale blocks."""
    import bitsandbytes as bnb

    from tcompose.models.quantize import quantize_linear_layers

    p = torch.nn.Parameter(torch.randn(40, 1000))  # 40,000 values: 8-bit moments
    opt = bnb.optim.AdamW8bit([p])
    p.sum().backward()
    opt.step()
    got = sum(_tensor_bytes(v) for k, v in opt.state[p].items() if torch.is_tensor(v) and not k.startswith("qmap"))
    assert got == adam8bit_bytes(p.numel()) < 8 * p.numel()
    holder = torch.nn.Module()
    holder.transformer_blocks = torch.nn.ModuleList([torch.nn.Linear(1024, 520, bias=False)])  # 8,320 blocks of 64
    quantize_linear_layers(holder, "nf4", torch.bfloat16, "cpu")
    w = holder.transformer_blocks[0].weight
    s = w.quant_state
    assert _tensor_bytes(w.data) + _tensor_bytes(s.absmax) + _tensor_bytes(s.state2.absmax) + \
        _tensor_bytes(s.offset) == nf4_bytes(1024 * 520)


@pytest.mark.parametrize("size", ["sd35-medium", "flux-dev"])
def test_real_size_counts_equal_a_meta_model_with_its_adapters(size):
    """SD3.5-medium and FLUX.1-dev built on the meta device with peft's adapters added: parameters, buffers and
    adapter parameters as counted; the published sizes (2.24B, 11.9B)."""
    from tcompose.bench.memory import build_transformer
    from tcompose.models.families import family_named
    from tcompose.models.lora import add_lora

    family, config = dit_sizes()[size]
    with torch.device("meta"):
        model = build_transformer(family, config)
    base = sum(p.numel() for p in model.parameters())
    add_lora(model, 16, targets=family_named(family).lora_targets)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    count = transformer_memory(size, 16, "bf16", "adamw", "bf16", frozen_parts=False)
    assert (count["transformer_parameters"], count["trainable_parameters"]) == (base, lora)
    buffers = sum(b.numel() for b in model.buffers() if b.is_floating_point())
    assert count["weights_bytes"] == (base + buffers) * 2 + lora * 4
    assert count["optimizer_bytes"] == 8 * lora and count["gradients_bytes"] == 4 * lora
    assert base == {"sd35-medium": 2_243_171_520, "flux-dev": 11_901_408_320}[size]
    assert lora == {"sd35-medium": 11_943_936, "flux-dev": 26_148_864}[size]


@pytest.mark.parametrize("size, encoders", [("sd35-medium", {"t5": 4_762_310_656, "clip_l": 123_650_304,
                                                             "clip_g": 694_659_840}),
                                            ("flux-dev", {"t5": 4_762_310_656, "clip_l": 123_060_480})])
def test_text_encoders_count_while_caching_and_not_in_training(size, encoders):
    """The text encoders (their published parameter counts: T5-XXL's encoder, CLIP-L, OpenCLIP bigG with
    projections) are on the device while --cache-text encodes, beside the VAE; in training only the VAE stays, and
    --no-cache-text keeps them beside the transformer."""
    cached = transformer_memory(size, 16, "nf4", "adamw8bit", "bf16")
    kept = transformer_memory(size, 16, "nf4", "adamw8bit", "bf16", cache_text=False)
    counts = cached["frozen_parts_parameters"]
    assert {k: v for k, v in counts.items() if k != "vae"} == encoders
    text, vae = 2 * sum(encoders.values()), 2 * counts["vae"]
    assert cached["caching_bytes"] == text + vae and kept["caching_bytes"] == 0
    assert cached["training_bytes"] == cached["transformer_bytes"] + vae
    assert kept["training_bytes"] == kept["total_bytes"] == cached["training_bytes"] + text
    assert cached["total_bytes"] == max(cached["training_bytes"], text + vae)
