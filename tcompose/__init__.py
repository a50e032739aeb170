"""tcompose: TokenCompose grounding losses for Stable Diffusion, and the stages around them."""

__version__ = "0.1.0"
