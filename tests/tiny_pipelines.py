"""Tiny Diffusers pipelines built in code (no downloads), saved as ordinary Diffusers folders, so the
local backend loads them with its normal loading code. Shapes follow diffusers' own test fixtures."""

from __future__ import annotations

import json
import string
from pathlib import Path


def _clip_tokenizer(directory: Path):
    from transformers import CLIPTokenizer

    from training.tiny_shapes.tokenizer import _bytes_to_unicode

    alphabet = list(_bytes_to_unicode().values())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab.update({ch + "</w>": len(alphabet) + i for i, ch in enumerate(alphabet)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(str(directory), model_max_length=77)


def _clip_text(tok, hidden: int, layers: int, heads: int, inter: int, projection: int | None = None):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    cfg = CLIPTextConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, hidden_size=hidden, intermediate_size=inter,
                         num_attention_heads=heads, num_hidden_layers=layers, vocab_size=len(tok),
                         max_position_embeddings=77, **({"projection_dim": projection} if projection else {}))
    return CLIPTextModel(cfg).eval()


def build_tiny_sd(out: Path) -> Path:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    tok = _clip_tokenizer(out.parent / f"{out.name}-tok")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=32,
                                in_channels=4, out_channels=4,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                cross_attention_dim=8, norm_num_groups=2).eval()
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4,
                        norm_num_groups=2).eval()
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=_clip_text(tok, 8, 2, 2, 16),
                                   tokenizer=tok, scheduler=sched, safety_checker=None,
                                   feature_extractor=None, image_encoder=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out)
    return out


def build_tiny_flux(out: Path) -> Path:
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    clip_tok = _clip_tokenizer(out.parent / f"{out.name}-tok")
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + c, -2.0) for c in string.ascii_lowercase]
    pieces += [(c, -3.0) for c in string.ascii_letters + string.digits + string.punctuation]
    pieces += [("\u2581", -4.0)]
    t5_tok = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2,
                                         joint_attention_dim=32, pooled_projection_dim=32,
                                         axes_dims_rope=[4, 4, 8]).eval()
    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                 num_heads=4, relative_attention_num_buckets=8, decoder_start_token_id=0,
                                 pad_token_id=0, eos_token_id=1)).eval()
    torch.manual_seed(0)
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,),
                        layers_per_block=1, latent_channels=1, norm_num_groups=1, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035).eval()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(),
                        text_encoder=_clip_text(clip_tok, 32, 5, 4, 37, projection=32),
                        text_encoder_2=t5, tokenizer=clip_tok, tokenizer_2=t5_tok,
                        transformer=transformer, vae=vae)
    pipe.save_pretrained(out)
    return out


def make_lora(pipe_dir: Path, out: Path, seed: int) -> Path:
    """A random (untrained but non-zero) LoRA for the tiny SD UNet, saved in the diffusers format."""
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(str(pipe_dir), local_files_only=True)
    torch.manual_seed(seed)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    StableDiffusionPipeline.save_lora_weights(save_directory=str(out), unet_lora_layers=layers,
                                              safe_serialization=True)
    return out


def write_gguf_transformer(pipe_dir: Path, out: Path) -> Path:
    """The pipeline's transformer as a GGUF file, as llama.cpp-style tools write them: 2-D weights whose rows
    split into 32-value blocks in Q8_0 (int8 with a scale per block), the rest float32."""
    import gguf
    import numpy as np
    from safetensors.torch import load_file

    weights: dict = {}
    for f in sorted((pipe_dir / "transformer").glob("*.safetensors")):
        weights |= load_file(f)
    writer = gguf.GGUFWriter(str(out), arch="flux")
    for name, tensor in weights.items():
        data = tensor.float().numpy()
        if data.ndim == 2 and data.shape[-1] % 32 == 0:
            q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, data.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def make_controlnet(pipe_dir: Path, out: Path, seed: int) -> Path:
    """A ControlNet for the tiny SD UNet (made from it, as training starts), with its zero convolutions given
    random weights so that it moves the output (a fresh one adds exactly nothing)."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(pipe_dir / "unet")
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8))
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]:
            for p in module.parameters():
                p.normal_(0.0, 0.5)
    net.save_pretrained(out)
    return out


def make_ip_adapter(pipe_dir: Path, out: Path, seed: int) -> tuple[Path, Path]:
    """An IP-Adapter for the tiny SD UNet with a tiny CLIP image encoder (32x32 input), in the file layout
    h94/IP-Adapter uses (`image_proj.*` and `ip_adapter.N.to_k_ip/to_v_ip` weights, one pair per
    cross-attention layer); random weights, large enough to move the output. Returns (weights, encoder)."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    unet = UNet2DConditionModel.from_pretrained(pipe_dir / "unet")
    cross = unet.config.cross_attention_dim
    torch.manual_seed(seed)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        patch_size=8, projection_dim=16)).eval()
    encoder.save_pretrained(out / "image_encoder")
    weights = {"image_proj.proj.weight": torch.randn(cross * 4, 16), "image_proj.proj.bias": torch.randn(cross * 4),
               "image_proj.norm.weight": torch.ones(cross), "image_proj.norm.bias": torch.zeros(cross)}
    key = 1
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            hidden = unet.get_submodule(name.removesuffix(".processor")).to_k.weight.shape[0]
            weights[f"ip_adapter.{key}.to_k_ip.weight"] = torch.randn(hidden, cross)
            weights[f"ip_adapter.{key}.to_v_ip.weight"] = torch.randn(hidden, cross)
            key += 2
    save_file(weights, out / "ip-adapter.safetensors")
    return out / "ip-adapter.safetensors", out / "image_encoder"


def make_flux_controlnet(pipe_dir: Path, out: Path, seed: int) -> Path:
    """A FLUX ControlNet for the tiny FLUX transformer (made from it, as training starts), its zero layers given
    random weights so that it moves the output."""
    import torch
    from diffusers import FluxControlNetModel, FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(pipe_dir / "transformer")
    net = FluxControlNetModel.from_transformer(transformer, num_layers=1, num_single_layers=1,
                                               attention_head_dim=16, num_attention_heads=2)
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in [net.controlnet_x_embedder, *net.controlnet_blocks, *net.controlnet_single_blocks]:
            for p in module.parameters():
                p.normal_(0.0, 0.5)
    net.save_pretrained(out)
    return out
