"""Static training memory of SD1.4, SDXL, SD3.5-medium and FLUX.1-dev, full finetuning and LoRA: weights, gradients,
AdamW state (and, for the transformers, quantized bases, 8-bit AdamW and the text encoders).

    python benchmarks/memory.py                 # the Markdown table of benchmarks/README.md, and JSON
    python benchmarks/memory.py --precision fp32

Computed from the models' configurations on the meta device (:mod:`tcompose.bench.memory`); runs anywhere in
seconds. Activations are not included: `tcompose bench --sections train,sdxl` measures the peak on a GPU.
"""

from __future__ import annotations

import argparse
import json

from tcompose.bench.memory import dit_markdown, dit_memory_table, markdown, memory_table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16",
                    help="training precision: the frozen parts and a LoRA run's frozen base are held in it")
    ap.add_argument("--lora-rank", type=int, default=64)
    args = ap.parse_args()
    rows = memory_table((("sd14", None), ("sd14", args.lora_rank), ("sdxl", None), ("sdxl", args.lora_rank)),
                        args.precision)
    dit = dit_memory_table(precision=args.precision)
    print(markdown(rows))
    print(dit_markdown(dit))
    print(json.dumps(rows + dit, indent=2))


if __name__ == "__main__":
    main()
