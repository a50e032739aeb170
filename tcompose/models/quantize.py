"""A quantized frozen base for LoRA training (``train-unet --quantize-base nf4|int8``), through bitsandbytes.

    n = quantize_linear_layers(transformer, "nf4", compute_dtype=torch.bfloat16, device=device)
    add_lora(transformer, rank=16, ...)       # peft wraps the 4-bit / 8-bit layers; only the adapters train

Every ``torch.nn.Linear`` inside the transformer blocks (``transformer_blocks``, ``single_transformer_blocks``: the
bulk of the weights) becomes a bitsandbytes layer holding the same weights quantized: ``nf4``
(``Linear4bit``, NormalFloat-4 in blocks of 64 with a scale per block, itself quantized to 8 bits in blocks of 256
(bitsandbytes' default double quantization): about 0.52 byte per weight, computing in ``compute_dtype``) or ``int8`` (``Linear8bitLt``, LLM.int8() with outlier threshold 6.0, 1 byte per weight).
Embeddings, norms and the input / output projections stay in the training precision, as in QLoRA. The weights are
quantized on ``device`` (bitsandbytes quantizes when a parameter is moved). The adapters stay float32 and see the
quantized weights' outputs, so the LoRA learns against the base the run will not save: the adapters are saved
alone and load on the full-precision base (``load_lora_weights``), which is what QLoRA does too. Each layer moves
to ``device`` on its own, quantized as it moves: a model left on the CPU is never on the device whole and
unquantized.

bitsandbytes >= 0.45 runs both layer types on CPU as well as CUDA (slow on CPU: tests only).
"""

from __future__ import annotations

import torch

KINDS = ("nf4", "int8")
#: The module-name parts whose linear layers are quantized.
BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")


def _quantized(linear: torch.nn.Linear, kind: str, compute_dtype: torch.dtype):
    import bitsandbytes as bnb

    bias = linear.bias is not None
    if kind == "nf4":
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=compute_dtype,
                                  quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4")
        # bitsandbytes repacks a 4-bit weight for its CPU inference kernel on the first no-grad eval call, after which
        # training calls fail (an in-place bias add on a tensor that needs grad): a training base keeps one layout
        layer.support_avx512bf16_for_cpu = False
    else:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                                    threshold=6.0, device="meta")
        layer.weight = bnb.nn.Int8Params(linear.weight.data, requires_grad=False, has_fp16_weights=False)
    if bias:
        layer.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
    return layer


def quantize_linear_layers(model: torch.nn.Module, kind: str, compute_dtype: torch.dtype,
                           device: torch.device | str) -> int:
    """Replace the linear layers of ``model``'s transformer blocks by bitsandbytes ``kind`` layers (``nf4`` or
    ``int8``) on ``device``, frozen; returns how many were replaced."""
    if kind not in KINDS:
        raise ValueError(f"quantization {kind!r}: choose one of {', '.join(KINDS)}")
    count = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is not torch.nn.Linear or not any(b in full for b in BLOCKS):
                continue
            setattr(module, child_name, _quantized(child, kind, compute_dtype).to(device))
            count += 1
    model.requires_grad_(False)
    return count
