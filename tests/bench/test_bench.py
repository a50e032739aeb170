"""`tcompose bench`: the quick bench runs through the CLI and writes well-formed JSON; the baseline step (the
original's way: explicit attention everywhere, every map kept, per-example losses) computes the same losses
and gradients as the fast step; FLOPs are counted and MFU follows from them."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tcompose.bench.baseline import baseline_losses, keep_all_attention
from tcompose.bench.measure import count_flops
from tcompose.bench.train import LAYERS, TC, make_batch, make_scheduler
from tcompose.grounding.objective import tokencompose_losses
from tcompose.testing.tiny_sd import build_tiny_unet


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def test_quick_bench_json_structure(quick_report):
    r = quick_report
    assert r["tcompose_bench"] == 1 and r["quick"] is True and r["errors"] == []
    assert set(r["section_s"]) == {"train_b2", "train_b2_lora4", "sdxl_b1", "sdxl_b1_lora4", "sd3_lora4_bf16",
                                   "sd3_full", "flux_lora4_nf4", "flux_lora4_bf16", "flux_full", "baseline", "generate",
                                   "detect", "masks"}
    m = r["machine"]
    assert m["device"] == "cpu" and m["threads"] == 1 and m["torch"] == torch.__version__
    assert r["matmul"]["dtype"] == "fp32" and _positive(r["matmul"]["tflops"])
    s = r["settings"]
    assert s["dtype"] == "fp32" and s["unet"] == "tiny" and s["train_batch_sizes"] == [2] and s["latent_size"] == 16

    train = [row for row in r["train"] if not row["lora_rank"]]
    assert [row["gradient_checkpointing"] for row in train] == [False, True]  # default: both
    lora = [row for row in r["train"] if row["lora_rank"]]
    assert [row["lora_rank"] for row in lora] == [4, 4] and all(row["trainable_params_m"] < row["params_m"] / 10 for row in lora)
    xl = r["sdxl"]
    assert [(row["size"], row["lora_rank"], row["gradient_checkpointing"]) for row in xl] == [
        ("tiny-sdxl", None, False), ("tiny-sdxl", None, True), ("tiny-sdxl", 4, False), ("tiny-sdxl", 4, True)]
    assert all(_positive(row["images_per_s"]) and _positive(row["mfu"]) for row in xl)
    assert r["headline"]["peak_mem_mb_sdxl_lora_b1_ckpt"] == xl[3]["peak_mem_mb"]
    for row in train:
        assert row["batch_size"] == 2 and row["latent_size"] == 16 and row["size"] == "tiny"
        for key in ("step_s_plain", "step_s_tc", "overhead_ratio", "images_per_s", "images_per_s_plain",
                    "peak_mem_mb", "flops_per_step_tc", "flops_per_step_plain", "mfu", "mfu_plain"):
            assert _positive(row[key]), (key, row[key])
        assert row["images_per_s"] == pytest.approx(2 / row["step_s_tc"], rel=1e-2)
        assert row["mfu"] == pytest.approx(
            row["flops_per_step_tc"] / row["step_s_tc"] / (r["matmul"]["tflops"] * 1e12), rel=1e-2)
    # Checkpointing recomputes, it does not change the model's FLOPs (counted without it).
    assert train[0]["flops_per_step_tc"] == train[1]["flops_per_step_tc"]

    base = r["baseline"]
    assert base["batch_size"] == 1 and base["dtype"] == "fp32"
    for key in ("step_s", "images_per_s", "peak_mem_mb", "flops_per_step", "mfu", "kept_maps", "kept_maps_mb"):
        assert _positive(base[key]), (key, base[key])
    # Tiny UNet: 7 transformer blocks, each with a self- and a cross-attention layer; all 14 maps kept.
    assert base["kept_maps"] == 14
    # Batch 1 does half the work of batch 2.
    assert base["flops_per_step"] == pytest.approx(train[0]["flops_per_step_tc"] / 2, rel=0.05)

    head = r["headline"]
    best = max(train, key=lambda row: row["images_per_s"])
    assert head["speedup_vs_baseline"] == pytest.approx(best["images_per_s"] / base["images_per_s"], rel=1e-2)
    assert head["mfu_best"] == max(row["mfu"] for row in train)
    assert head["loss_overhead"] == pytest.approx(best["overhead_ratio"] - 1, abs=1e-3)
    assert head["peak_mem_mb_b8_ckpt"] is None  # no batch 8 in the quick run
    status = {t["name"]: t["status"] for t in r["targets"]}
    assert status == {"speedup_vs_baseline": "n/a (--quick)", "mfu_best": "n/a (--quick)",
                      "loss_overhead": "n/a (--quick)", "peak_mem_mb_b8_ckpt": "not measured",
                      "peak_mem_mb_sdxl_lora_b1_ckpt": "n/a (--quick)",
                      "peak_mem_mb_sd35_lora_ckpt_run": "not measured",  # tiny transformers: no real peak
                      "peak_mem_mb_flux_lora_nf4_ckpt_run": "not measured"}

    assert [g["batch_size"] for g in r["generate"]] == [1, 2]
    for g in r["generate"]:
        assert g["unet_batch"] == 2 * g["batch_size"] and g["resolution"] == 64
        assert _positive(g["images_per_s"]) and _positive(g["unet_steps_per_s"])
    assert r["detect"]["model"] == "owlv2-tiny" and _positive(r["detect"]["images_per_s"])
    masks = r["masks"]
    assert masks["boxes_per_image"] == 2 and masks["batch_size"] == 2
    for key in ("images_per_s", "images_per_s_incl_preprocess", "detector_s_per_batch", "segmenter_s_per_batch"):
        assert _positive(masks[key]), key
    assert masks["images_per_s_incl_preprocess"] <= masks["images_per_s"]


def test_bench_json_to_stdout_and_bad_options(capsys):
    from tcompose.cli import main

    code = main(["bench", "--quick", "--threads", "1", "--sections", "detect", "--json", "-"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["settings"]["sections"] == ["detect"] and set(report["section_s"]) == {"detect"}
    assert "train" not in report and report["headline"]["speedup_vs_baseline"] is None
    assert main(["bench", "--quick", "--sections", "train,nope"]) == 2
    assert "unknown ['nope']" in capsys.readouterr().err
    assert main(["bench", "--quick", "--resolution", "100"]) == 2


@pytest.mark.parametrize("batch_size", [1, 3])
def test_baseline_step_equals_fast_step(batch_size):
    """Same UNet, same inputs, fp32: the original's way and the fast path give the same losses and gradients."""
    unet = build_tiny_unet(0, "tiny")
    latents, emb, batch = make_batch(batch_size, 16, unet.config.cross_attention_dim, torch.device("cpu"), seed=3)
    sched = make_scheduler()
    out, grads = {}, {}
    for name, fn in (("fast", tokencompose_losses), ("baseline", baseline_losses)):
        unet.zero_grad(set_to_none=True)
        losses = fn(unet, latents, emb, batch, sched, LAYERS, backward=lambda loss: loss.backward(), **TC)
        out[name] = {k: float(losses[k].detach()) for k in ("ldm", "token", "pixel", "total")}
        grads[name] = torch.cat([p.grad.flatten() for p in unet.parameters()])
    for k in ("ldm", "token", "pixel", "total"):
        assert out["baseline"][k] == pytest.approx(out["fast"][k], rel=1e-5, abs=1e-7), k
    assert out["fast"]["token"] > 0 and out["fast"]["pixel"] > 0
    scale = grads["fast"].abs().max()
    assert (grads["baseline"] - grads["fast"]).abs().max() <= 1e-4 * scale
    # The processors are restored afterwards.
    assert all(type(p).__name__ == "AttnProcessor2_0" for p in unet.attn_processors.values())


def test_baseline_keeps_every_map():
    """Every attention layer's probabilities are kept, self [B*heads, HW, HW] and cross [B*heads, HW, 77]."""
    unet = build_tiny_unet(0, "tiny")
    latents, emb, _ = make_batch(2, 16, unet.config.cross_attention_dim, torch.device("cpu"))
    with torch.no_grad(), keep_all_attention(unet) as kept:
        unet(latents, torch.tensor([10, 500]), encoder_hidden_states=emb)
        unet(latents, torch.tensor([10, 500]), encoder_hidden_states=emb)  # a fresh list per forward pass
    assert len(kept.maps) == 14
    for block, is_cross, heads, probs in kept.maps:
        hw = probs.shape[1]
        assert probs.shape == (2 * heads, hw, 77 if is_cross else hw)
        torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)))
    assert sum(c for _, c, _, _ in kept.maps) == 7
    assert {b for b, *_ in kept.maps} == {"down", "mid", "up"}


def test_count_flops_matches_hand_count():
    """A linear layer and CPU SDPA: FLOPs by hand (2 * M * N * K per matmul)."""
    lin = torch.nn.Linear(64, 32, bias=False)
    x = torch.randn(8, 64, requires_grad=True)
    assert count_flops(lambda: lin(x).sum().backward()) == 3 * 2 * 8 * 64 * 32  # forward, grad input, grad weight
    q, k, v = (torch.randn(2, 4, 16, 8) for _ in range(3))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    assert count_flops(lambda: sdpa(q, k, v)) == 2 * (2 * 2 * 4 * 16 * 16 * 8)  # QK^T and PV


def test_training_memory_counts_the_real_models_from_their_configs():
    """Parameter counts of the published checkpoints (SD1.4: 859,520,964 in the UNet; SDXL: 2,567,463,684), and
    the bytes per parameter of full finetuning (16) and of a LoRA run (the base at 2, the adapters at 16)."""
    from tcompose.bench.memory import memory_table, model_parameters, training_memory
    from tcompose.models.lora import lora_parameter_count
    from tcompose.testing.tiny_sd import UNET_SIZES

    assert model_parameters("sd14") == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
    assert model_parameters("sdxl")["unet"] == 2_567_463_684
    assert model_parameters("sdxl")["text_encoder_2"] == 694_659_840
    full = training_memory("sd14")
    assert full["weights_gb"] == pytest.approx(859_520_964 * 4 / 1e9) and full["optimizer_gb"] == 2 * full["gradients_gb"]
    lora = training_memory("sdxl", 64)
    n = lora_parameter_count(UNET_SIZES["sdxl"], 64)
    assert lora["trainable_parameters"] == n
    assert lora["weights_gb"] == pytest.approx((2_567_463_684 * 2 + n * 4) / 1e9)
    assert lora["total_gb"] < 24 < training_memory("sdxl")["total_gb"]
    assert len(memory_table()) == 4
