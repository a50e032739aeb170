"""Published numbers the reports print beside measured ones, always marked "published, not measured".

- :data:`TABLE1`: the TokenCompose paper's Table 1 (Wang et al., CVPR 2024): Object Accuracy (VISOR's OA),
  MultiGen MG2-5 on COCO and ADE20K (1,000 prompts x 10 images, OWLv2-L/14, threshold 0.1; MG1 is not
  reported), FID on COCO (10k val2017 captions) and Flickr30K (1k pairs), and latency (s/img, 50 steps,
  batch 1). Rows carry only the columns the sources give; the rest are None.
- :data:`VISOR_TABLE`: VISOR's own table (Gokhale et al. 2022) for SD1.4 and SD2.1: OA, VISOR_cond,
  VISOR_uncond, VISOR_1..4 (25,280 spatial prompts x 4 images, OWL-ViT B/32, threshold 0.1).
- :data:`GENEVAL_TABLE`: GenEval's own results (:data:`GENEVAL_SOURCE`): overall and the six task scores, as
  fractions (553 prompts x 4 images, mmdet's Mask2Former Swin-S and CLIP ViT-L/14 colours).
"""

from __future__ import annotations

TABLE1: dict[str, dict] = {
    "SD1.4": {
        "OA": 29.86,
        "MG_coco": {"MG2": 90.72, "MG3": 50.74, "MG4": 11.68, "MG5": 0.88},
        "MG_ade20k": {"MG2": 89.81, "MG3": 53.96, "MG4": 16.52, "MG5": 1.89},
        "FID_coco": 20.88, "FID_flickr30k": 71.46, "latency_s": 7.54,
    },
    "Attend-and-Excite SD1.4": {
        "OA": 45.13,
        "MG_coco": {"MG2": 93.64, "MG3": 65.10, "MG4": 28.01, "MG5": 6.01},
        "MG_ade20k": {"MG2": 91.74, "MG3": 62.51, "MG4": 26.12, "MG5": 5.89},
        "FID_coco": None, "FID_flickr30k": None, "latency_s": None,
    },
    "TokenCompose SD1.4": {
        "OA": 52.15,
        "MG_coco": {"MG2": 98.08, "MG3": 76.16, "MG4": 28.81, "MG5": 3.28},
        "MG_ade20k": {"MG2": 97.75, "MG3": 76.93, "MG4": 33.92, "MG5": 6.21},
        "FID_coco": 20.19, "FID_flickr30k": 71.13, "latency_s": 7.56,
    },
    "TokenCompose SD2.1": {
        "OA": 60.10, "MG_coco": None, "MG_ade20k": None, "FID_coco": None, "FID_flickr30k": None,
        "latency_s": None,
    },
}

VISOR_TABLE: dict[str, dict[str, float]] = {
    "SD1.4": {"OA": 29.86, "VISOR_cond": 62.98, "VISOR_uncond": 18.81, "VISOR_1": 46.60, "VISOR_2": 20.11,
              "VISOR_3": 6.89, "VISOR_4": 1.63},
    "SD2.1": {"OA": 47.83, "VISOR_cond": 63.24, "VISOR_uncond": 30.25, "VISOR_1": 64.42, "VISOR_2": 35.74,
              "VISOR_3": 16.13, "VISOR_4": 4.70},
}

GENEVAL_SOURCE = ("GenEval README, Main results (github.com/djghosh13/geneval at af4902f; Ghosh et al., NeurIPS 2023 "
                  "Datasets and Benchmarks): 553 prompts x 4 images, mmdet Mask2Former Swin-S")


def _geneval(overall: float, *tasks: float) -> dict:
    names = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
    return {"overall": overall, "tasks": dict(zip(names, tasks))}


GENEVAL_TABLE: dict[str, dict] = {
    "SD1.5": _geneval(0.43, 0.97, 0.38, 0.35, 0.76, 0.04, 0.06),
    "SD2.1": _geneval(0.50, 0.98, 0.51, 0.44, 0.85, 0.07, 0.17),
    "SDXL": _geneval(0.55, 0.98, 0.74, 0.39, 0.85, 0.15, 0.23),
    "IF-XL": _geneval(0.61, 0.97, 0.74, 0.66, 0.81, 0.13, 0.35),
}

PUBLISHED_TAG = "published, not measured"


def multigen_rows(dataset: str) -> dict[str, dict[str, float]]:
    """MultiGen's published MG2-5 of ``dataset`` (``coco`` or ``ade20k``) per model, from :data:`TABLE1`."""
    key = f"MG_{dataset}"
    return {name: row[key] for name, row in TABLE1.items() if row.get(key)}
