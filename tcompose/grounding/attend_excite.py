"""Attend-and-Excite (Chefer et al., SIGGRAPH 2023): move the latent, at sampling time, so that every subject token
gets a strong cross-attention peak somewhere in the image. Pure tensor code over a denoiser and a capture.

At denoising step ``i`` (of the scheduler's timesteps), for each image: run the denoiser on its latent with the
prompt's conditional embedding, capture the cross-attention maps whose side is ``resolution`` (16 at 512 px),
average them over layers and heads (every head weighs the same) to ``A [r, r, T]``; drop the start token and the
last position, scale by 100 and softmax over the remaining text tokens; smooth each subject token's map with a
3x3 Gaussian (sigma 0.5, reflect padding) and take its maximum ``m_k``. The loss is ``max_k max(0, 1 - m_k)``.
While ``i`` is below ``steps`` the latent takes one gradient step ``z <- z - a_i * dL/dz`` with
``a_i = scale * sqrt(linspace(1, 0.5, n_steps)[i])``; at the ``thresholds`` steps (``{0: 0.05, 10: 0.5,
20: 0.8}``) it first refines, up to ``refinements`` gradient steps, until the loss is at most ``1 - threshold``.
These are the paper's and diffusers' ``StableDiffusionAttendAndExcitePipeline``'s rules and defaults; a step past
``steps`` that is no threshold step changes nothing, so it runs no denoiser pass here (diffusers runs one and
discards it).

``subject`` token positions: every token of every excited word counts as a subject of its own (a word split
into several tokens, "wine glass" or "skateboarder", is excited token by token): the loss is the worst of them.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

__all__ = ["DEFAULT_THRESHOLDS", "gaussian_kernel", "token_maxima", "excite_loss", "step_sizes", "excite_latent",
           "average_at_resolution"]

DEFAULT_THRESHOLDS: Mapping[int, float] = {0: 0.05, 10: 0.5, 20: 0.8}


def gaussian_kernel(size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """The normalised 2-D Gaussian ``[size, size]`` of A&E's smoothing (its ``exp(-((x - mu) / (2 sigma))^2)``)."""
    x = torch.arange(size, dtype=torch.float32)
    g = torch.exp(-(((x - (size - 1) / 2) / (2 * sigma)) ** 2)) / (sigma * math.sqrt(2 * math.pi))
    kernel = g[:, None] * g[None, :]
    return kernel / kernel.sum()


def token_maxima(maps: torch.Tensor, indices: Sequence[int], kernel: torch.Tensor | None = None) -> torch.Tensor:
    """Each subject token's smoothed attention peak ``[K]`` from averaged maps ``[r, r, T]`` (T = 77).

    Softmax of ``100 * maps[..., 1:-1]`` over the text tokens (the start token and the last position left out),
    then per index a 3x3 Gaussian smoothing with reflect padding, and the maximum."""
    probs = torch.softmax(maps[:, :, 1:-1] * 100, dim=-1)
    kernel = (gaussian_kernel() if kernel is None else kernel).to(probs.device, probs.dtype)[None, None]
    out = []
    for i in indices:
        image = F.pad(probs[:, :, i - 1][None, None], (1, 1, 1, 1), mode="reflect")
        out.append(F.conv2d(image, kernel)[0, 0].max())
    return torch.stack(out)


def excite_loss(maxima: torch.Tensor) -> torch.Tensor:
    """``max_k max(0, 1 - m_k)``: the subject whose attention peak is weakest."""
    return (1.0 - maxima).clamp(min=0).max()


def step_sizes(scale: float, n_steps: int) -> list[float]:
    """The gradient step of each denoising step: ``scale * sqrt(linspace(1, 0.5, n_steps))``."""
    if n_steps == 1:
        return [float(scale)]
    return [float(scale) * math.sqrt(1.0 - 0.5 * i / (n_steps - 1)) for i in range(n_steps)]


def average_at_resolution(maps: Mapping[str, Sequence[torch.Tensor]], side: int) -> torch.Tensor:
    """Captured maps (group -> list of ``[1, heads, HW, T]``) of the groups at ``side`` averaged over layers and
    heads, every head weighing the same: ``[side, side, T]``."""
    picked = [m[0] for group, ms in maps.items() if group.endswith(f"_{side}") for m in ms]
    if not picked:
        raise ValueError(f"no captured attention map has side {side}")
    stacked = torch.cat(picked, dim=0)  # [sum of heads, HW, T]
    return stacked.mean(0).reshape(side, side, stacked.shape[-1])


def excite_latent(predict: Callable[[torch.Tensor], object], capture: Callable, latent: torch.Tensor, step: int,
                  indices: Sequence[int], *, resolution: int, groups: Sequence[str], n_steps: int, steps: int = 25,
                  thresholds: Mapping[int, float] = DEFAULT_THRESHOLDS, refinements: int = 20,
                  scale: float = 20.0) -> tuple[torch.Tensor, float | None]:
    """One image's latent ``[1, C, h, w]`` after Attend-and-Excite at denoising step ``step`` (of ``n_steps``);
    returns it (detached) and the loss it was last measured at (None when the step changes nothing).

    ``predict(z)`` runs the denoiser on ``z`` with the image's conditional embedding at this step's timestep
    (nothing scaled, as the method does); ``capture(layers)`` is the family's capture context (records the
    ``groups`` of side ``resolution``)."""
    threshold = thresholds.get(step)
    if step >= steps and threshold is None:
        return latent, None
    size = step_sizes(scale, n_steps)[step]

    def measure(z: torch.Tensor) -> torch.Tensor:
        with capture(groups) as store:
            predict(z)
            maps = average_at_resolution(store.maps, resolution)
        return excite_loss(token_maxima(maps, indices))

    def update(z: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        grad = torch.autograd.grad(loss, [z], retain_graph=True)[0]
        return z - size * grad

    with torch.enable_grad():
        z = latent.detach().clone().requires_grad_(True)
        loss = measure(z)
        if threshold is not None and loss > 1.0 - threshold:
            target = max(0.0, 1.0 - threshold)
            for _ in range(refinements):
                if not loss > target:
                    break
                z = z.detach().clone().requires_grad_(True)
                loss = measure(z)
                if loss != 0:
                    z = update(z, loss)
            z = z.detach().clone().requires_grad_(True)
            loss = measure(z)
        if step < steps and loss != 0:
            z = update(z, loss)
    return z.detach(), float(loss.detach()) if torch.is_tensor(loss) else float(loss)
