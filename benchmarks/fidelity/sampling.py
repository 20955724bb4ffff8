"""Deterministic DDIM sampling of the fidelity model, and the scores of its samples.

Sampling: DDIM (eta = 0, so the only randomness is the starting noise) with classifier-free guidance,
the CFG batch laid out [unconditional, conditional] in one UNet call as diffusers' SDXL pipeline does.
Image i starts from noise drawn from its own seed, so a sample does not depend on how images are
batched, and the pruned and unpruned models start every image from the same noise.

Scores: PSNR / MSE of a sample against the unpruned model's sample of the same seed (fidelity), the
classifier's accuracy on the intended label, and the Frechet distance of the classifier's penultimate
features to those of real images.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DDIMScheduler
from scipy import linalg

import atedm

from .model import FidelityModel

PIXEL_RANGE = 2.0  # images live in [-1, 1]


def initial_noise(seeds: list[int], channels: int, size: int) -> torch.Tensor:
    """(N, channels, size, size) standard normal noise, image i drawn from a generator seeded with seeds[i]."""
    return torch.cat([
        torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(seed)) for seed in seeds
    ])


def sample_images(model: FidelityModel, labels: torch.Tensor, seeds: list[int], num_steps: int = 25,
                  guidance_scale: float = 2.0, batch_size: int = 50) -> torch.Tensor:
    """Samples (N, C, size, size) in [-1, 1] of ``labels`` from ``seeds``, with whatever patch the UNet carries."""
    if len(seeds) != len(labels):
        raise ValueError(f"one seed per label needed; got {len(seeds)} seeds for {len(labels)} labels")
    scheduler = DDIMScheduler.from_config(model.scheduler_config)
    scheduler.set_timesteps(num_steps)
    if atedm.get_state(model.unet) is not None:
        atedm.set_timesteps(model.unet, scheduler.timesteps)  # DSAP's early phase = the first steps of this schedule
    noise = initial_noise(seeds, model.unet.config.in_channels, model.unet.config.sample_size)
    samples = []
    for start in range(0, len(labels), batch_size):
        batch_labels = labels[start:start + batch_size]
        context = model.context(torch.cat([torch.full_like(batch_labels, model.spec.null_label), batch_labels]))
        latents = noise[start:start + batch_size]
        for timestep in scheduler.timesteps:
            with torch.no_grad():
                eps = model.unet(torch.cat([latents, latents]), timestep, encoder_hidden_states=context).sample
            eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
            latents = scheduler.step(eps, timestep, latents).prev_sample
        samples.append(latents.clamp(-1.0, 1.0))
    return torch.cat(samples)


sample_digits = sample_images  # the digits model's name for it, which tests/test_fidelity.py imports


def mse_per_image(samples: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return (samples - reference).pow(2).flatten(1).mean(1)


def psnr_per_image(samples: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """PSNR in dB over the [-1, 1] range; capped at 100 dB for identical images (MSE 0)."""
    mse = mse_per_image(samples, reference).clamp_min(PIXEL_RANGE**2 * 1e-10)
    return 10.0 * torch.log10(PIXEL_RANGE**2 / mse)


def classifier_accuracy(model: FidelityModel, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return (model.classifier(images).argmax(1) == labels).float().mean().item()


def classifier_features(model: FidelityModel, images: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model.classifier.features(images).double().numpy()


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2) of two (N, D) feature sets (FID's formula)."""
    mu_a, mu_b = features_a.mean(0), features_b.mean(0)
    cov_a, cov_b = np.cov(features_a, rowvar=False), np.cov(features_b, rowvar=False)
    covmean, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    covmean = covmean.real  # sqrtm of a product of PSD matrices: any imaginary part is round-off
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2.0 * covmean))
