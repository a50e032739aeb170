"""The report of ``tcompose bench``: MFU, the headline figures, the targets, and the table.

:func:`summarise` completes the raw measurements of :func:`tcompose.bench.run`::

    train[i]["mfu"]       = flops_per_step_tc / step_s_tc / (matmul.tflops * 1e12)   (also mfu_plain)
    baseline["mfu"]       = flops_per_step / step_s / (matmul.tflops * 1e12)
    headline.speedup_vs_baseline = best train images/s (losses on) / baseline images/s
    headline.loss_overhead       = step_s_tc / step_s_plain - 1 at that best configuration
    headline.mfu_best            = the highest train MFU (the best batch)
    headline.peak_mem_mb_b8_ckpt = peak memory at batch 8 with gradient checkpointing (CUDA: reserved)
    headline.peak_mem_mb_sdxl_lora_b1_ckpt = the same for SDXL at 1024 px, LoRA, batch 1 (the 24 GB card target)
    headline.peak_mem_mb_sd35_lora_ckpt_run / _flux_lora_nf4_ckpt_run = a train-unet run's peak for the SD3.5-medium
        LoRA (bf16 base) / FLUX.1-dev LoRA (nf4 base) at 1024 px with checkpointing: the step's peak plus the VAE
        that stays beside it (the bench feeds random embeddings; --cache-text, the default, frees the text encoders
        before training), or the text encoders + VAE while they encode the captions, whichever is larger, by byte
        count: the 16 / 24 GiB goals

The headline's training figures are full finetuning's (LoRA rows are another workload).

Targets (issue 6) are judged on CUDA with real-size models only; otherwise their status is "n/a (CPU)" or
"n/a (--quick)", and "not measured" when the run did not include what they need.
"""

from __future__ import annotations

from typing import Any

GIB_24 = 24 * 1024  # MiB
TARGETS = (
    ("speedup_vs_baseline", ">=", 5.0, "x", "images/s vs the original's step (fp32, batch 1, explicit attention)"),
    ("mfu_best", ">=", 0.35, "", "model FLOP utilisation at the best batch"),
    ("loss_overhead", "<=", 0.10, "", "step time with the grounding losses on vs lambda = gamma = 0, minus 1"),
    ("peak_mem_mb_b8_ckpt", "<=", float(GIB_24), "MiB", "peak memory at batch 8 with gradient checkpointing (24 GiB)"),
    ("peak_mem_mb_sdxl_lora_b1_ckpt", "<=", float(GIB_24), "MiB",
     "SDXL at 1024 px, LoRA, batch 1, gradient checkpointing (24 GiB)"),
    ("peak_mem_mb_sd35_lora_ckpt_run", "<=", float(16 * 1024), "MiB",
     "SD3.5-medium LoRA r16 at 1024 px, batch 1, checkpointing, 8-bit AdamW: a train-unet run's peak (16 GiB)"),
    ("peak_mem_mb_flux_lora_nf4_ckpt_run", "<=", float(GIB_24), "MiB",
     "FLUX.1-dev LoRA r16 on an nf4 base at 1024 px, batch 1, checkpointing, 8-bit AdamW: a train-unet run's peak "
     "(24 GiB)"),
)


STEP_SECTIONS = ("train", "sdxl", "sd3", "flux")  # sections of training-step rows


def _ok(row: Any) -> bool:
    return isinstance(row, dict) and "error" not in row and "skipped" not in row


def summarise(report: dict) -> dict:
    """Add MFU, ``headline`` and ``targets`` to a report (in place; also returned)."""
    rate = report["matmul"]["tflops"] * 1e12
    for r in [r for key in STEP_SECTIONS for r in report.get(key, []) if _ok(r)]:
        if "flops_per_step_tc" in r:
            r["mfu"] = round(r["flops_per_step_tc"] / r["step_s_tc"] / rate, 4)
            r["mfu_plain"] = round(r["flops_per_step_plain"] / r["step_s_plain"] / rate, 4)
    train = [r for r in report.get("train", []) if _ok(r) and not r.get("lora_rank")]  # full finetuning
    base = report.get("baseline")
    if _ok(base) and "flops_per_step" in base:
        base["mfu"] = round(base["flops_per_step"] / base["step_s"] / rate, 4)
    head: dict[str, Any] = {"speedup_vs_baseline": None, "mfu_best": None, "loss_overhead": None,
                            "peak_mem_mb_b8_ckpt": None, "peak_mem_mb_sdxl_lora_b1_ckpt": None, "best_train": None}
    xl = [r for r in report.get("sdxl", []) if _ok(r) and r.get("lora_rank") and r["batch_size"] == 1
          and r["gradient_checkpointing"]]
    if xl:
        head["peak_mem_mb_sdxl_lora_b1_ckpt"] = xl[0].get("peak_reserved_mb", xl[0]["peak_mem_mb"])
    if train:
        best = max(train, key=lambda r: r["images_per_s"])
        head["best_train"] = {k: best.get(k) for k in ("batch_size", "gradient_checkpointing", "dtype", "compiled",
                                                       "channels_last", "images_per_s")}
        head["loss_overhead"] = round(best["overhead_ratio"] - 1, 4)
        head["loss_overhead_max"] = round(max(r["overhead_ratio"] for r in train) - 1, 4)
        if any("mfu" in r for r in train):
            top = max((r for r in train if "mfu" in r), key=lambda r: r["mfu"])
            head["mfu_best"] = top["mfu"]
            head["mfu_best_at"] = {k: top[k] for k in ("batch_size", "gradient_checkpointing")}
        b8 = [r for r in train if r["batch_size"] == 8 and r["gradient_checkpointing"]]
        if b8:
            head["peak_mem_mb_b8_ckpt"] = b8[0].get("peak_reserved_mb", b8[0]["peak_mem_mb"])
        if _ok(base):
            head["speedup_vs_baseline"] = round(best["images_per_s"] / base["images_per_s"], 3)
    for key, section, base, goal in (("peak_mem_mb_sd35_lora_ckpt_run", "sd3", "bf16", "sd35-medium"),
                                     ("peak_mem_mb_flux_lora_nf4_ckpt_run", "flux", "nf4", "flux-dev")):
        head[key] = None
        rows = [r for r in report.get(section, []) if _ok(r) and r.get("lora_rank") and r.get("base") == base
                and r["gradient_checkpointing"] and r["size"] == goal]
        counts = [m for m in report.get("memory_bytes", []) if m["size"] == goal]
        if rows and counts:  # the step's peak + the VAE beside it, or the caching phase, by byte count
            step = rows[0].get("peak_reserved_mb", rows[0]["peak_mem_mb"]) + counts[0]["frozen_parts_bytes"] / 2**20
            head[key] = round(max(step, counts[0]["caching_bytes"] / 2**20), 1)
    report["headline"] = head
    device = report["machine"]["device"]
    targets = []
    for name, op, goal, unit, what in TARGETS:
        value = head.get(name)
        if value is None:
            status = "not measured"
        elif report.get("quick"):
            status = "n/a (--quick)"
        elif device != "cuda":
            status = "n/a (CPU)"
        else:
            status = "pass" if (value >= goal if op == ">=" else value <= goal) else "fail"
        targets.append({"name": name, "target": f"{op} {goal:g}{(' ' + unit) if unit else ''}", "value": value,
                        "status": status, "what": what})
    report["targets"] = targets
    return report


def table_rows(report: dict) -> list[tuple[str, str, str, str]]:
    """(section, setting, figure, unit) rows of the report."""
    rows: list[tuple[str, str, str, str]] = []
    m = report["matmul"]
    rows.append(("machine", f"{m['dtype']} matmul n={m['n']}", f"{m['tflops']:.3f}", "TFLOP/s"))
    # TF32 applies on CUDA only: every section but the baseline follows --tf32/--no-tf32
    tf32 = "" if report["machine"].get("device") != "cuda" else \
        f" TF32 {'on' if report.get('settings', {}).get('tf32') else 'off'}"
    for section, r in ((key, r) for key in STEP_SECTIONS for r in report.get(key, [])):
        lora = (f" LoRA r{r['lora_rank']}" + (f" {r['base']} base" if r.get("base") else "") if r.get("lora_rank")
                else " full") + (f" {r['optimizer']}" if r.get("optimizer") else "")
        if not _ok(r):
            what = "skipped" if "skipped" in r else "error"
            rows.append((section, f"{r.get('size', '')} batch {r.get('batch_size', 1)}{lora}", what, r.get(what, "")))
            continue
        setting = f"{r['size']} B{r['batch_size']} {r['latent_size'] * 8}px {r['dtype']} ckpt " \
                  f"{'on' if r['gradient_checkpointing'] else 'off'}{' compiled' if r['compiled'] else ''}" \
                  f"{' channels_last' if r.get('channels_last') else ''}{lora}{tf32}"
        rows += [(section, setting, f"{r['images_per_s']:.3f}", "images/s (losses on)"),
                 (section, setting, f"{r['images_per_s_plain']:.3f}", "images/s (lambda=gamma=0)"),
                 (section, setting, f"{r['overhead_ratio'] - 1:+.1%}", "losses' overhead"),
                 (section, setting, f"{r.get('mfu', float('nan')):.1%}", "MFU"),
                 (section, setting, f"{r.get('peak_reserved_mb', r['peak_mem_mb']):.0f}", "MiB peak")]
        if "vae_encode_s" in r:  # the step starts from latents (--cache-latents); without it, it also encodes
            rows += [(section, setting, f"{r['images_per_s_with_vae_encode']:.3f}", "images/s with VAE encode"),
                     (section, setting, f"{r['vae_encode_share']:.1%}", "step time --cache-latents saves")]
        if "token_loss" in r:
            rows.append((section, setting, f"{r['token_loss']:.4f}", "token loss (first step, captured maps)"))
    for m in report.get("memory_bytes", []):
        from .memory import dit_label

        rows.append(("bytes", dit_label(m) + " (by count)", f"{m['total_bytes'] / 1e9:.2f}",
                     "GB before activations (the VAE beside the step; text encoders + VAE while caching)"
                     + (f"; {m['left_for_activations_gb']:.1f} GB left of {m['goal_gib']} GiB" if "goal_gib" in m
                        else "")))
    base = report.get("baseline")
    if base is not None:
        if _ok(base):
            setting = f"{base['size']} B1 fp32, explicit attention, all maps kept" + \
                (", torch's default TF32 (matmuls off, cuDNN convolutions on)" if base.get("tf32") else "")
            rows += [("baseline", setting, f"{base['images_per_s']:.3f}", "images/s"),
                     ("baseline", setting, f"{base.get('mfu', float('nan')):.1%}", "MFU"),
                     ("baseline", setting, f"{base['peak_mem_mb']:.0f}", "MiB peak")]
        else:
            rows.append(("baseline", "", "error", base["error"]))
    head = report.get("headline", {})
    if head.get("speedup_vs_baseline") is not None:
        b = head["best_train"]
        rows.append(("headline", f"B{b['batch_size']} ckpt {'on' if b['gradient_checkpointing'] else 'off'} vs baseline",
                     f"{head['speedup_vs_baseline']:.2f}", "x images/s"))
    gen = report.get("generate")
    if isinstance(gen, dict):
        rows.append(("generate", "", "error", gen["error"]))
    for g in gen or []:
        setting = f"B{g['batch_size']} {g['resolution']}px {g['steps']} steps"
        rows += [("generate", setting, f"{g['images_per_s']:.3f}", "images/s"),
                 ("generate", setting, f"{g['unet_steps_per_s']:.2f}", f"UNet steps/s (batch {g['unet_batch']})")]
    for key, label in (("detect", "model"), ("masks", "segmenter")):
        d = report.get(key)
        if d is None:
            continue
        if not _ok(d):
            rows.append((key, "", "error", d["error"]))
            continue
        setting = f"{d[label]} B{d['batch_size']}"
        if key == "masks":
            setting = f"{d['detector']} + {d['segmenter']} B{d['batch_size']}, {d['boxes_per_image']} boxes/image"
        rows.append((key, setting, f"{d['images_per_s']:.3f}", "images/s"))
    return rows


def print_report(report: dict, console=None) -> None:
    """The table and the targets, with rich (stderr by default)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(stderr=True)
    m = report["machine"]
    table = Table(title=f"tcompose bench: {m['device_name']} ({m['device']}), torch {m['torch']}"
                        f"{', CUDA ' + m['cuda'] if m.get('cuda') else ''}, {m['threads']} threads")
    for col, justify in (("section", "left"), ("setting", "left"), ("figure", "right"), ("unit", "left")):
        table.add_column(col, justify=justify)
    for row in table_rows(report):
        table.add_row(*row)
    console.print(table)
    targets = Table(title="targets")
    for col in ("target", "goal", "measured", "status"):
        targets.add_column(col)
    style = {"pass": "green", "fail": "red"}
    for t in report["targets"]:
        value = "-" if t["value"] is None else f"{t['value']:g}"
        targets.add_row(t["name"], t["target"], value, f"[{style.get(t['status'], 'dim')}]{t['status']}[/]")
    console.print(targets)
    for note in report.get("notes", []):
        console.print(f"[dim]note: {note}[/]")
