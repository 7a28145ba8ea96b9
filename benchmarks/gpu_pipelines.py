"""GPU benchmark: SDXL- and FLUX.1-architecture pipelines built from their published configs with
random weights (the same compute as the real weights), 1024x1024, eager versus torch.compile
(regional), seconds per image and images per second. Text encoding is excluded: the denoiser gets
random prompt embeddings of the real shapes; the VAE decode is included.

    python benchmarks/gpu_pipelines.py [--steps-sdxl 30] [--steps-flux 28] [--tiny]

`--tiny` shrinks every width so the script's code path can be checked on a CPU; its numbers mean
nothing. Results go to benchmarks/results/gpu_pipelines.json; copy them into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import time

import torch
from _util import save
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)


def sdxl(tiny: bool, device: str, dtype: torch.dtype) -> StableDiffusionXLPipeline:
    s = 16 if tiny else 1  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json, vae/config.json
    unet = UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=[320 // s * 1, 640 // s, 1280 // s],
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        transformer_layers_per_block=[1, 2, 10 if not tiny else 1], attention_head_dim=[5, 10, 20],
        cross_attention_dim=2048 // s, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=256 // s, projection_class_embeddings_input_dim=(256 // s) * 6 + 1280 // s,
        norm_num_groups=32 // (s if tiny else 1) or 2)
    vae = AutoencoderKL(block_out_channels=[128 // s, 256 // s, 512 // s, 512 // s], latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        layers_per_block=2, sample_size=1024, scaling_factor=0.13025,
                        norm_num_groups=32 // (s if tiny else 1) or 2)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                     tokenizer_2=None, unet=unet, scheduler=sched)
    return pipe.to(device, dtype)


def flux(tiny: bool, device: str, dtype: torch.dtype) -> FluxPipeline:
    s = 8 if tiny else 1  # black-forest-labs/FLUX.1-dev transformer/config.json, vae/config.json
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=19 if not tiny else 1,
        num_single_layers=38 if not tiny else 1, attention_head_dim=16 if tiny else 128,
        num_attention_heads=2 if tiny else 24, joint_attention_dim=4096 // s,
        pooled_projection_dim=768 // s, guidance_embeds=True,
        axes_dims_rope=[4, 6, 6] if tiny else [16, 56, 56])
    vae = AutoencoderKL(block_out_channels=[128 // s, 256 // s, 512 // s, 512 // s], latent_channels=16,
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        layers_per_block=2, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.1159, scaling_factor=0.3611, norm_num_groups=32 // (s if tiny else 1))
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                            max_shift=1.15)
    pipe = FluxPipeline(scheduler=sched, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)
    return pipe.to(device, dtype)


def run(pipe, kind: str, steps: int, size: int, device: str, dtype: torch.dtype, tiny: bool) -> float:
    g = torch.Generator("cpu").manual_seed(0)
    if kind == "sdxl":
        d = 2048 // (16 if tiny else 1)
        embeds = torch.randn(1, 77, d, generator=g).to(device, dtype)
        pooled = torch.randn(1, 1280 // (16 if tiny else 1), generator=g).to(device, dtype)
        kw = dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=embeds,
                  negative_pooled_prompt_embeds=pooled, guidance_scale=7.0)
    else:
        div = 8 if tiny else 1
        kw = dict(prompt_embeds=torch.randn(1, 512, 4096 // div, generator=g).to(device, dtype),
                  pooled_prompt_embeds=torch.randn(1, 768 // div, generator=g).to(device, dtype),
                  guidance_scale=3.5)
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    pipe(height=size, width=size, num_inference_steps=steps, output_type="pil", **kw)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps-sdxl", type=int, default=30)
    ap.add_argument("--steps-flux", type=int, default=28)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    size = 128 if args.tiny else 1024
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "tiny": args.tiny,
               "size": size, "dtype": str(dtype), "torch": torch.__version__}
    for kind, build, steps in (("sdxl", sdxl, args.steps_sdxl), ("flux", flux, args.steps_flux)):
        pipe = build(args.tiny, device, dtype)
        pipe.set_progress_bar_config(disable=True)
        run(pipe, kind, 2, size, device, dtype, args.tiny)  # warm-up
        eager = min(run(pipe, kind, steps, size, device, dtype, args.tiny) for _ in range(args.repeats))
        denoiser = pipe.unet if kind == "sdxl" else pipe.transformer
        t = time.perf_counter()
        denoiser.compile_repeated_blocks(fullgraph=True)
        run(pipe, kind, 2, size, device, dtype, args.tiny)
        compile_s = time.perf_counter() - t
        compiled = min(run(pipe, kind, steps, size, device, dtype, args.tiny) for _ in range(args.repeats))
        results[kind] = {"steps": steps, "eager_s_per_image": round(eager, 3),
                         "eager_images_per_s": round(1 / eager, 3), "compile_s": round(compile_s, 1),
                         "compiled_s_per_image": round(compiled, 3),
                         "compiled_images_per_s": round(1 / compiled, 3)}
        del pipe, denoiser
        if device == "cuda":
            torch.cuda.empty_cache()
    save("gpu_pipelines" + ("_tiny" if args.tiny else ""), results)


if __name__ == "__main__":
    main()
