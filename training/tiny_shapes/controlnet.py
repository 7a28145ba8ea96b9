"""Train a canny ControlNet for tiny-shapes, on CPU, from the shipped model.

    python -m training.tiny_shapes.controlnet [--steps N] [--out DIR]

The ControlNet starts as a copy of the shipped UNet's encoder (`ControlNetModel.from_unet`) with zero
convolutions, as in the ControlNet paper; the UNet, VAE and text encoder stay frozen. Each training image
is a scene from the same generator as the model's own data, its control image the canny edges that
imagebroker's `preprocess: true` computes (`imagebroker.control.canny_edges`), so what the net learns is
exactly what a user's request sends. Half the captions are dropped (the paper's 50%), so the net learns to
place the shape from the edges alone, not only when the caption is there. Timesteps are drawn mostly from
the noisy end (t = 1000 (1 - u^3), as T2I-Adapter trains) and the loss is weighted towards the image's
error there (1/SNR, clipped): that is where a shape's place is decided. With the plain noise loss the net
had moved no sample's layout after 750 steps (uniform timesteps) or 250 (cubic); see docs/tiny-shapes.md.

The result is a Diffusers `ControlNetModel` directory, written to `controlnet-canny/` beside the model's
own components and declared in the catalog (`providers/data/local.yaml`) as tiny-shapes' `canny` ControlNet.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import yaml
from diffusers import ControlNetModel, DDPMScheduler, StableDiffusionPipeline

from imagebroker.control import canny_edges

from .data import batch
from .train import DEFAULT_OUT, HERE, encode_text, log, to_tensor


def control_tensor(images: np.ndarray) -> torch.Tensor:
    """Canny edges of each image as the ControlNet pipeline feeds them: 3 channels in [0, 1]."""
    edges = np.stack([canny_edges(im) for im in images]).astype(np.float32) / 255.0
    return torch.from_numpy(edges)[:, None].repeat(1, 3, 1, 1)


def train(pipe: StableDiffusionPipeline, net: ControlNetModel, cfg: dict, steps: int, work: Path) -> float:
    c = cfg["controlnet"]
    rng = np.random.default_rng(cfg["seed"] + 7)
    gen = torch.Generator().manual_seed(cfg["seed"] + 7)
    noise_sched = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    )
    opt = torch.optim.AdamW(net.parameters(), lr=c["lr"], weight_decay=0.01)
    warmup = 100
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps))
    )
    for module in (pipe.vae, pipe.text_encoder, pipe.unet):
        module.requires_grad_(False)
        module.eval()
    net.train()
    sf = pipe.vae.config.scaling_factor
    offset = cfg["unet"].get("offset_noise") or 0.0
    t0 = time.perf_counter()
    running = 0.0
    for step in range(1, steps + 1):
        images, captions, _ = batch(rng, c["batch_size"])
        captions = ["" if rng.random() < c["caption_dropout"] else t for t in captions]
        cond = control_tensor(images)
        with torch.no_grad():
            latents = pipe.vae.encode(to_tensor(images)).latent_dist.mean * sf
            text = encode_text(pipe.tokenizer, pipe.text_encoder, captions)
        noise = torch.randn(latents.shape, generator=gen)
        if offset:   # as the UNet was trained: it expects noise with a per-channel offset
            noise += offset * torch.randn((*latents.shape[:2], 1, 1), generator=gen)
        # cubic sampling (as T2I-Adapter trains): most steps at high noise, where the layout is decided
        u = torch.rand((latents.shape[0],), generator=gen)
        t = ((1 - u ** c.get("timestep_power", 1)) * 1000).long().clamp(0, 999)
        noisy = noise_sched.add_noise(latents, noise, t)
        down, mid = net(noisy, t, encoder_hidden_states=text, controlnet_cond=cond, return_dict=False)
        pred = pipe.unet(noisy, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid).sample
        # weighted towards the image (x0) error at high noise, where a shape's place is decided: there the
        # noise-prediction error of a misplaced shape is scaled down by sqrt(SNR) and gives almost no gradient
        ab = noise_sched.alphas_cumprod[t]
        weight = ((1 - ab) / ab).clamp(1.0, c.get("max_loss_weight", 1.0))
        loss = (weight * ((pred - noise) ** 2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        running += loss.item()
        if step % 50 == 0:
            log(f"controlnet step {step}/{steps} loss {running / 50:.5f} ({time.perf_counter() - t0:.0f} s)")
            running = 0.0
        if step % c["checkpoint_every"] == 0 and step < steps:
            net.save_pretrained(work / f"controlnet-{step}")
    net.eval()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=HERE / "config.yaml")
    ap.add_argument("--model", type=Path, default=DEFAULT_OUT, help="the trained tiny-shapes model")
    ap.add_argument("--out", type=Path, default=None, help="default: MODEL/controlnet-canny")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "tiny-shapes-controlnet",
                    help="checkpoints go here")
    args = ap.parse_args()
    cfg = yaml.safe_load(args.config.read_text())
    steps = args.steps or cfg["controlnet"]["steps"]
    out = args.out or args.model / "controlnet-canny"
    torch.manual_seed(cfg["seed"] + 7)
    pipe = StableDiffusionPipeline.from_pretrained(args.model, local_files_only=True)
    net = ControlNetModel.from_unet(
        pipe.unet, conditioning_embedding_out_channels=tuple(cfg["controlnet"]["embedding_channels"]))
    params = sum(p.numel() for p in net.parameters())
    log(f"controlnet parameters {params}; torch threads {torch.get_num_threads()}")
    seconds = train(pipe, net, cfg, steps, args.work)
    net.save_pretrained(out)
    info = {"stage": "controlnet-canny", "steps": steps, "seconds": round(seconds), "parameters": params,
            "seed": cfg["seed"] + 7, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": f"{platform.machine()} {os.cpu_count()} cores"}
    (out / "training_info.json").write_text(json.dumps(info, indent=1) + "\n")
    log(f"done: {info}")


if __name__ == "__main__":
    main()
