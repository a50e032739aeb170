"""The flow-matching objective (SD3 / FLUX) against diffusers' training scripts' recipe: timesteps drawn by
compute_density_for_timestep_sampling from each example's own generator, sigmas looked up as their get_sigmas does,
noisy input and target against a float64 recomputation, the loss weights, and the FLUX call (packed latents, ids,
guidance)."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from tcompose.grounding.flow_matching import WEIGHTING_SCHEMES, FlowMatchingObjective
from tcompose.grounding.objective import tokencompose_losses
from tcompose.io.errors import UserError
from tcompose.testing.tiny_dit import FLUX_SCHEDULER, SD3_SCHEDULER, build_tiny_flux_transformer

SCHEDULERS = {"sd3": SD3_SCHEDULER, "flux": FLUX_SCHEDULER}


def scheduler(name):
    return FlowMatchEulerDiscreteScheduler(**SCHEDULERS[name])


def diffusers_sigmas(sched, timesteps, ndim, dtype):
    """train_dreambooth_lora_sd3.py's get_sigmas."""
    sigmas = sched.sigmas.to(dtype=dtype)
    schedule = sched.timesteps
    index = [(schedule == t).nonzero().item() for t in timesteps]
    sigma = sigmas[index].flatten()
    while len(sigma.shape) < ndim:
        sigma = sigma.unsqueeze(-1)
    return sigma


@pytest.mark.parametrize("scheme", WEIGHTING_SCHEMES)
@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_timesteps_are_the_scripts_draw_from_each_examples_generator(name, scheme):
    sched = scheduler(name)
    objective = FlowMatchingObjective(weighting_scheme=scheme, logit_mean=0.3, logit_std=0.8, mode_scale=1.29)
    for seed in range(5):
        t = objective.draw_timestep(sched, torch.Generator().manual_seed(seed))
        u = compute_density_for_timestep_sampling(scheme, 1, 0.3, 0.8, 1.29, generator=torch.Generator().manual_seed(seed))
        assert t.dtype == torch.float32 and t.ndim == 0
        assert t == sched.timesteps[(u * 1000).long()][0]
        assert t == objective.draw_timestep(sched, torch.Generator().manual_seed(seed))  # a function of the seed


@pytest.mark.parametrize("scheme", WEIGHTING_SCHEMES)
@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_noisy_input_target_and_weights_against_float64(name, scheme):
    sched = scheduler(name)
    objective = FlowMatchingObjective(weighting_scheme=scheme)
    g = torch.Generator().manual_seed(1)
    latents, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    timesteps = torch.stack([objective.draw_timestep(sched, g) for _ in range(3)])
    noisy, target = objective.training_inputs(sched, latents, noise, timesteps)
    sigma = diffusers_sigmas(sched, timesteps, 4, torch.float32)
    assert torch.equal(objective.sigmas(sched, timesteps, 4, torch.float32), sigma)
    assert torch.equal(noisy, (1.0 - sigma) * latents + sigma * noise)  # the scripts' own expression
    s = sigma.double()
    torch.testing.assert_close(noisy.double(), (1 - s) * latents.double() + s * noise.double(), rtol=0, atol=1e-6)
    torch.testing.assert_close(target.double(), noise.double() - latents.double(), rtol=0, atol=1e-6)
    weights = objective.loss_weights(sched, timesteps, None)
    expected = compute_loss_weighting_for_sd3(scheme, sigma).flatten()
    if weights is None:
        assert torch.equal(expected, torch.ones(3))
    else:
        torch.testing.assert_close(weights, expected.float())


def test_timesteps_off_the_schedule_are_read_as_t_over_1000():
    """The grounding score's fixed timesteps (100 ... 900) are noise levels t / 1000."""
    sched = scheduler("sd3")
    sigma = FlowMatchingObjective().sigmas(sched, torch.tensor([100, 500, 900]), 1, torch.float32)
    torch.testing.assert_close(sigma, torch.tensor([0.1, 0.5, 0.9]))


def test_the_flux_call_is_the_scripts_call():
    """Packed latents, img_ids of the 2 x 2 grid, timestep / 1000 and the guidance value; prediction unpacked."""
    transformer = build_tiny_flux_transformer().eval()
    objective = FlowMatchingObjective(packed=True, guidance=3.5)
    g = torch.Generator().manual_seed(0)
    noisy = torch.randn(2, 4, 8, 8, generator=g)
    cond = {"encoder_hidden_states": torch.randn(2, 6, 32, generator=g), "pooled_projections": torch.randn(2, 32, generator=g),
            "txt_ids": torch.zeros(6, 3)}
    timesteps = torch.tensor([250.0, 750.0])
    with torch.no_grad():
        got = objective.predict(transformer, noisy, timesteps, cond)
        packed = FluxPipeline._pack_latents(noisy, 2, 4, 8, 8)
        ids = FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32)
        out = transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=torch.tensor([3.5]).expand(2),
                          img_ids=ids, return_dict=False, **cond)[0]
    assert torch.equal(got, FluxPipeline._unpack_latents(out, 16, 16, 2))


def test_the_grounding_losses_run_through_the_objective():
    """tokencompose_losses with the flow-matching objective: the maps of the captured block on the 4 x 4 grid,
    gradients reach the transformer through the denoising and the grounding terms."""
    transformer = build_tiny_flux_transformer()
    objective = FlowMatchingObjective(packed=True, guidance=3.5)
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(1, 1, 32, 32)
    masks[..., :16, :16] = 1
    batch = {"noise": torch.randn(1, 4, 8, 8, generator=g), "timesteps": torch.tensor([500.0]), "masks": masks,
             "word_index": torch.tensor([[[1, 2]]]), "word_valid": torch.tensor([[True]])}
    cond = {"encoder_hidden_states": torch.randn(1, 6, 32, generator=g), "pooled_projections": torch.randn(1, 32, generator=g),
            "txt_ids": torch.zeros(6, 3)}
    losses = tokencompose_losses(transformer, torch.randn(1, 4, 8, 8, generator=g), cond, batch,
                                 scheduler("flux"), ("double_1",), 1.0, 0.1, objective=objective)
    assert losses["token"] > 0 and losses["pixel"] > 0
    losses["total"].backward()
    assert transformer.transformer_blocks[1].attn.to_q.weight.grad.abs().sum() > 0


def test_bad_settings_are_refused():
    with pytest.raises(UserError, match="--weighting-scheme 'uniform'"):
        FlowMatchingObjective(weighting_scheme="uniform")
    with pytest.raises(UserError, match="--attention-norm"):
        FlowMatchingObjective(attention_norm="image")
