"""Train tiny-shapes: a ~15 MB text-to-image latent diffusion model, from nothing, on CPU.

    python -m training.tiny_shapes.train [--out DIR] [--config FILE] [--unet-steps N]

Stage 1 trains the VAE (64x64 RGB <-> 16x16x4 latents); stage 2 trains the UNet and the text encoder
together on the frozen VAE's latents, dropping 10% of captions so classifier-free guidance works;
stage 3 fine-tunes the VAE decoder alone on the frozen encoder's latents (sharper edges, truer
colours; the latent space, and so the UNet, is unchanged).

    python -m training.tiny_shapes.train --stage decoder --from DIR   # stage 3 on a saved model
    python -m training.tiny_shapes.train --resume DIR --unet-steps N  # N more stage-2 steps, then stage 3
The result is an ordinary Diffusers directory (StableDiffusionPipeline) that the local backend loads.
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
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .data import batch
from .tokenizer import write_tokenizer_files

HERE = Path(__file__).parent
DEFAULT_OUT = HERE.parents[1] / "imagebroker" / "local_backend" / "models" / "tiny-shapes"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def build_models(cfg: dict, tokenizer: CLIPTokenizer):
    v = cfg["vae"]
    levels = len(v["block_out_channels"])
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=v["block_out_channels"],
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        latent_channels=v["latent_channels"],
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=cfg["image_size"],
    )
    t = cfg["text_encoder"]
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=t["hidden_size"],
            intermediate_size=t["hidden_size"] * 4,
            num_hidden_layers=t["layers"],
            num_attention_heads=t["heads"],
            max_position_embeddings=cfg["max_text_tokens"],
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    u = cfg["unet"]
    levels = len(u["block_out_channels"])
    unet = UNet2DConditionModel(
        sample_size=cfg["image_size"] // 2 ** (len(v["block_out_channels"]) - 1),
        in_channels=v["latent_channels"],
        out_channels=v["latent_channels"],
        block_out_channels=u["block_out_channels"],
        layers_per_block=1,
        down_block_types=["CrossAttnDownBlock2D"] * levels,
        up_block_types=["CrossAttnUpBlock2D"] * levels,
        cross_attention_dim=t["hidden_size"],
        attention_head_dim=u["attention_head_dim"],
        norm_num_groups=8,
        # "text": a pooled text embedding is added to the timestep embedding, so every ResNet block
        # sees the caption (global colour/shape facts), not only the cross-attention layers
        addition_embed_type=u.get("addition_embed_type"),
        addition_embed_type_num_heads=u.get("addition_embed_heads", 4),
    )
    return vae, text_encoder, unet


def train_vae(vae: AutoencoderKL, cfg: dict, rng: np.random.Generator) -> float:
    v = cfg["vae"]
    opt = torch.optim.AdamW(vae.parameters(), lr=v["lr"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, v["steps"])
    vae.train()
    t0 = time.perf_counter()
    for step in range(1, v["steps"] + 1):
        x = to_tensor(batch(rng, v["batch_size"])[0])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = torch.nn.functional.mse_loss(recon, x) + v["kl_weight"] * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            log(f"vae step {step}/{v['steps']} loss {loss.item():.5f} ({time.perf_counter() - t0:.0f} s)")
    vae.eval()
    with torch.no_grad():
        x = to_tensor(batch(rng, 256)[0])
        latents = vae.encode(x).latent_dist.mean
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    log(f"vae done in {time.perf_counter() - t0:.0f} s; latent scaling factor {scaling:.4f}")
    return time.perf_counter() - t0


def finetune_decoder(vae: AutoencoderKL, cfg: dict, rng: np.random.Generator) -> float:
    d = cfg["decoder"]
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    opt = torch.optim.AdamW(params, lr=d["lr"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, d["steps"])
    vae.eval()
    vae.decoder.train()
    t0 = time.perf_counter()
    for step in range(1, d["steps"] + 1):
        x = to_tensor(batch(rng, d["batch_size"])[0])
        with torch.no_grad():
            latents = vae.encode(x).latent_dist.mean
        recon = vae.decode(latents).sample
        loss = torch.nn.functional.mse_loss(recon, x) + torch.nn.functional.l1_loss(recon, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            log(f"decoder step {step}/{d['steps']} loss {loss.item():.5f} ({time.perf_counter() - t0:.0f} s)")
    vae.eval()
    return time.perf_counter() - t0


def encode_text(tokenizer, text_encoder, captions: list[str]) -> torch.Tensor:
    ids = tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    ).input_ids
    return text_encoder(ids)[0]


def train_unet(vae, text_encoder, unet, tokenizer, cfg: dict, rng, out: Path, steps: int):
    u = cfg["unet"]
    noise_sched = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    )
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=u["lr"], weight_decay=0.01)
    warmup = 200
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps))
    )
    gen = torch.Generator().manual_seed(cfg["seed"])
    unet.train()
    text_encoder.train()
    t0 = time.perf_counter()
    sf = vae.config.scaling_factor
    for step in range(1, steps + 1):
        images, captions, _ = batch(rng, u["batch_size"])
        captions = ["" if rng.random() < u["caption_dropout"] else c for c in captions]
        with torch.no_grad():
            latents = vae.encode(to_tensor(images)).latent_dist.mean * sf
        noise = torch.randn(latents.shape, generator=gen)
        if u.get("offset_noise"):  # a per-channel constant: the model can no longer read the image's mean
            # colour from the noisy input (SD's schedule leaks it at the last timestep), so it learns it from
            # the caption -- what a flat background on 16x16 latents needs
            noise += u["offset_noise"] * torch.randn((*latents.shape[:2], 1, 1), generator=gen)
        t = torch.randint(0, 1000, (latents.shape[0],), generator=gen)
        noisy = noise_sched.add_noise(latents, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=encode_text(tokenizer, text_encoder, captions)).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0:
            log(f"unet step {step}/{steps} loss {loss.item():.5f} ({time.perf_counter() - t0:.0f} s)")
        if step % u["checkpoint_every"] == 0 or step == steps:
            save(vae, text_encoder, unet, tokenizer, out / f"checkpoint-{step}")
    unet.eval()
    text_encoder.eval()
    return time.perf_counter() - t0


def save(vae, text_encoder, unet, tokenizer, directory: Path) -> None:
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        steps_offset=1,
    )
    # what SD's own scheduler configs carry, so that swapping in DDIM/PNDM (from_config) does not clip
    # x0 to [-1, 1] -- latents are not images
    scheduler.register_to_config(clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(directory)
    log(f"saved {directory}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=HERE / "config.yaml")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "tiny-shapes-train")
    ap.add_argument("--unet-steps", type=int, default=None)
    ap.add_argument("--stage", choices=["all", "decoder"], default="all")
    ap.add_argument("--from", dest="source", type=Path, default=None, help="a saved model (stage decoder)")
    ap.add_argument("--resume", type=Path, default=None, help="continue stage 2 from a saved model")
    ap.add_argument("--vae-from", type=Path, default=None, help="reuse a saved model's VAE: skip stage 1")
    args = ap.parse_args()
    cfg = yaml.safe_load(args.config.read_text())
    if args.stage == "decoder":
        decoder_only(args, cfg)
        return
    steps = args.unet_steps or cfg["unet"]["steps"]
    if args.resume:
        resume(args, cfg, steps)
        return
    torch.manual_seed(cfg["seed"])
    rng = np.random.default_rng(cfg["seed"])
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer_files(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp, model_max_length=cfg["max_text_tokens"])
    vae, text_encoder, unet = build_models(cfg, tokenizer)
    counts = {n: sum(p.numel() for p in m.parameters()) for n, m in
              {"vae": vae, "text_encoder": text_encoder, "unet": unet}.items()}
    log(f"parameters: {counts}; torch threads {torch.get_num_threads()}")
    if args.vae_from:
        vae = AutoencoderKL.from_pretrained(args.vae_from / "vae")
        vae_s = 0.0
        log(f"stage 1 skipped: VAE from {args.vae_from}")
    else:
        vae_s = train_vae(vae, cfg, rng)
    # each stage draws its own data stream, so `--vae-from` (stage 1 reused) trains exactly like a full run
    unet_s = train_unet(vae, text_encoder, unet, tokenizer, cfg, np.random.default_rng(cfg["seed"]), args.work,
                        steps)
    dec_s = finetune_decoder(vae, cfg, np.random.default_rng(cfg["seed"] + 3))
    save(vae, text_encoder, unet, tokenizer, args.out)
    info = {
        "seed": cfg["seed"], "vae_steps": cfg["vae"]["steps"], "unet_steps": steps,
        "decoder_steps": cfg["decoder"]["steps"], "decoder_seconds": round(dec_s),
        "vae_seconds": round(vae_s), "unet_seconds": round(unet_s), "parameters": counts,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
    }
    (args.out / "training_info.json").write_text(json.dumps(info, indent=1) + "\n")
    log(f"done: {info}")


def resume(args: argparse.Namespace, cfg: dict, steps: int) -> None:
    """More stage-2 steps (a fresh cosine schedule, new data) on a saved model, then stage 3."""
    torch.manual_seed(cfg["seed"] + 1)
    rng = np.random.default_rng(cfg["seed"] + 1)
    pipe = StableDiffusionPipeline.from_pretrained(args.resume, local_files_only=True)
    unet_s = train_unet(pipe.vae, pipe.text_encoder, pipe.unet, pipe.tokenizer, cfg, rng, args.work, steps)
    dec_s = finetune_decoder(pipe.vae, cfg, np.random.default_rng(cfg["seed"] + 3))
    save(pipe.vae, pipe.text_encoder, pipe.unet, pipe.tokenizer, args.out)
    info_path = args.resume / "training_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    info.update({"resumed_unet_steps": steps, "resumed_unet_seconds": round(unet_s),
                 "decoder_steps": cfg["decoder"]["steps"], "decoder_seconds": round(dec_s)})
    (args.out / "training_info.json").write_text(json.dumps(info, indent=1) + "\n")
    log(f"done: {info}")


def decoder_only(args: argparse.Namespace, cfg: dict) -> None:
    """Stage 3 alone, on a saved model: its decoder is replaced, nothing else changes."""
    torch.manual_seed(cfg["seed"])
    pipe = StableDiffusionPipeline.from_pretrained(args.source, local_files_only=True)
    secs = finetune_decoder(pipe.vae, cfg, np.random.default_rng(cfg["seed"] + 3))
    pipe.vae.save_pretrained(args.out / "vae")
    log(f"decoder fine-tuned in {secs:.0f} s; wrote {args.out / 'vae'}")


if __name__ == "__main__":
    main()
