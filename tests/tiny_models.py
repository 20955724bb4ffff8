"""Tiny SDXL-shaped models for the tests: the package's tiny UNet (``atedm.unets.tiny_unet_config``) with
random weights, its inputs, and a whole tiny SDXL pipeline around it."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

from atedm.unets import TINY_CROSS_DIM, TINY_TEXT_EMBED_DIM, tiny_unet_config


def tiny_sdxl_unet(seed: int = 0, **changes) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel.from_config(tiny_unet_config(**changes)).eval()


def unet_inputs(batch: int = 2, height: int = 16, width: int = 16, timestep: float = 500.0, seed: int = 1) -> dict:
    """UNet arguments for a latent of height x width (image size x 8)."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(batch, 4, height, width, generator=generator),
        "timestep": torch.tensor(timestep),
        "encoder_hidden_states": torch.randn(batch, 7, TINY_CROSS_DIM, generator=generator),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(batch, TINY_TEXT_EMBED_DIM, generator=generator),
            "time_ids": torch.randn(batch, 6, generator=generator),
        },
    }


def run_unet(unet: UNet2DConditionModel, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return unet(**inputs).sample


def _tiny_clip_tokenizer():
    """A byte-level CLIP tokenizer with no merges: every byte is a token (no download needed)."""
    from transformers import CLIPTokenizer

    # Printable stand-ins for the 256 byte values, as byte-level BPE vocabularies spell them.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    symbols = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={token: i for i, token in enumerate(tokens)}, merges=[], model_max_length=77)


def tiny_sdxl_pipeline(seed: int = 0):
    """A complete StableDiffusionXLPipeline with tiny random components (VAE factor 2, not 8)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    text_config = dict(hidden_size=TINY_CROSS_DIM // 2, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2,
                       vocab_size=514, max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config)).eval()
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(projection_dim=TINY_TEXT_EMBED_DIM, **text_config)).eval()
    vae = AutoencoderKL(block_out_channels=[32, 32], down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, sample_size=32).eval()
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=_tiny_clip_tokenizer(),
        tokenizer_2=_tiny_clip_tokenizer(),
        unet=tiny_sdxl_unet(seed),
        scheduler=EulerDiscreteScheduler(timestep_spacing="leading", steps_offset=1),
    )
