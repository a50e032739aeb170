"""The default models of every stage, in one place (no imports: the CLI reads them for its --help).

The paper's choices (docs/design.md, "Models and defaults"); each is a hub id, and every option that takes one
also takes a local folder.
"""

BASE_MODEL = "CompVis/stable-diffusion-v1-4"  # train-unet, generate, multigen, attnviz
GROUNDING_DINO = "IDEA-Research/grounding-dino-tiny"  # masks --source grounded-sam: boxes of the caption's phrases
SEGMENTER = "syscv-community/sam-hq-vit-huge"  # masks: boxes -> masks (SAM-HQ; facebook/sam-vit-huge also loads)
CAPTION_CLIP = "openai/clip-vit-large-patch14-336"  # masks --captions clip-best (the original's choice)
CLIP = "openai/clip-vit-large-patch14"  # train-clip (SD1.x's text encoder is this model's text tower)
OWLV2 = "google/owlv2-large-patch14-ensemble"  # multigen's detector
OWLVIT = "google/owlvit-base-patch32"  # visor's detector (VISOR's own)
MASK2FORMER = "facebook/mask2former-swin-small-coco-instance"  # geneval's detector (Swin-S COCO instance, as GenEval's)
