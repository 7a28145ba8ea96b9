"""Loading a text-to-image pipeline from what the policy declared: the bundled model, a Diffusers
folder, a single-file checkpoint, or a Hub id already in the local cache. Never touches the network."""

from __future__ import annotations

import logging
from typing import Any

# torchao (imported by diffusers when installed) reports each CUDA-only kernel library it could not load, and
# torch notes its enums: notes for their developers, not for someone generating an image on a CPU
for _name in ("torchao", "torch.utils._pytree", "diffusers.quantizers"):
    logging.getLogger(_name).setLevel(logging.ERROR)

import diffusers  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoPipelineForText2Image  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402
from transformers.utils import logging as transformers_logging  # noqa: E402

from ..errors import ModelNotFound  # noqa: E402
from ..providers.offering import Offering  # noqa: E402
from ..providers.settings import LocalSettings  # noqa: E402
from .sources import resolve_source  # noqa: E402

diffusers_logging.set_verbosity_error()

transformers_logging.disable_progress_bar()
transformers_logging.set_verbosity_error()

SINGLE_FILE = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
               "flux": "FluxPipeline", "sd3": "StableDiffusion3Pipeline"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def family_of(pipe: Any) -> str:
    name = type(pipe).__name__
    if "Flux" in name:
        return "flux"
    if "StableDiffusion3" in name:
        return "sd3"
    return "sdxl" if "XL" in name else "sd"


def pick_dtype(setting: str, family: str, device: str) -> torch.dtype:
    if setting != "auto":
        return DTYPES[setting]
    if device == "cpu":
        return torch.float32
    return torch.bfloat16 if family in ("flux", "sd3") else torch.float16


def tensor_bytes(t: torch.Tensor) -> int:
    """What a tensor holds in memory: a quantized one (torchao's tensor subclasses) by its inner tensors
    (int8 data and scales), not by the dtype it stands in for."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def pipeline_bytes(pipe: Any) -> int:
    return sum(tensor_bytes(p) for m in pipe.components.values()
               if isinstance(m, torch.nn.Module) for p in m.parameters())


def quantization_config(kind: str, family: str, backend: str = "torchao", dtype: Any = None) -> Any:
    """Diffusers' pipeline quantization for the denoiser (torchao weight-only, or bitsandbytes LLM.int8 /
    NF4 on CUDA), or None for `none`."""
    if kind == "none":
        return None
    from diffusers import PipelineQuantizationConfig

    denoiser = "transformer" if family in ("flux", "sd3") else "unet"
    if backend == "bitsandbytes":
        from diffusers import BitsAndBytesConfig

        bnb = BitsAndBytesConfig(load_in_8bit=True) if kind == "int8" else BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
        return PipelineQuantizationConfig(quant_mapping={denoiser: bnb})
    from diffusers import TorchAoConfig
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig

    config = Int8WeightOnlyConfig() if kind == "int8" else Int4WeightOnlyConfig()
    return PipelineQuantizationConfig(quant_mapping={denoiser: TorchAoConfig(config)})


def _gguf_pipeline(path: Any, base: str, family: str, dtype: torch.dtype, offering: str) -> Any:
    """A GGUF transformer (its weights stay quantized, dequantized per layer as it runs) in the pipeline of
    its base model, whose folder also gives the transformer's config."""
    from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig, SD3Transformer2DModel

    _, base_path = resolve_source(base)
    if base_path is None:
        raise ModelNotFound(f"base model {base!r} of {path.name} is not installed", provider="local",
                            offering=offering)
    cls = FluxTransformer2DModel if family == "flux" else SD3Transformer2DModel
    transformer = cls.from_single_file(str(path), config=str(base_path), subfolder="transformer",
                                       quantization_config=GGUFQuantizationConfig(compute_dtype=dtype),
                                       torch_dtype=dtype, local_files_only=True)
    return AutoPipelineForText2Image.from_pretrained(str(base_path), transformer=transformer, dtype=dtype,
                                                     local_files_only=True)


def load_pipeline(offering: Offering, settings: LocalSettings, device: str) -> tuple[Any, str]:
    s = offering.settings
    source = str(s.get("source", ""))
    kind, path = resolve_source(source)
    if path is None:
        raise ModelNotFound(f"local model {source!r} is not installed", provider="local",
                            offering=offering.id)
    family = str(s.get("family") or "sd")
    dtype = pick_dtype(str(s.get("dtype") or "auto"), family, device)
    variant = s.get("variant")
    quantization = str(s.get("quantization") or "none")
    backend = str(s.get("quantization_backend") or "torchao")
    quantized = quantization_config(quantization, family, backend, dtype) if quantization != "gguf" else None
    extra = {"quantization_config": quantized} if quantized is not None else {}
    if quantization == "gguf":
        pipe = _gguf_pipeline(path, str(s.get("base") or ""), family, dtype, offering.id)
    elif kind == "file":
        cls = getattr(diffusers, SINGLE_FILE[family])
        pipe = cls.from_single_file(str(path), dtype=dtype, local_files_only=True, **extra)
    else:
        pipe = AutoPipelineForText2Image.from_pretrained(str(path), dtype=dtype, local_files_only=True,
                                                         variant=variant, **extra)
    family = family_of(pipe)
    pipe.set_progress_bar_config(disable=True)
    if settings.cpu_offload and device == "cuda":
        pipe.enable_model_cpu_offload()
    else:
        pipe.to(device)
    if settings.vae_slicing:
        pipe.vae.enable_slicing()
    if settings.vae_tiling:
        pipe.vae.enable_tiling()
    denoiser = getattr(pipe, "transformer", None) or pipe.unet
    if settings.attention_backend:
        denoiser.set_attention_backend(settings.attention_backend)
    if settings.compile:
        denoiser.compile_repeated_blocks(fullgraph=True)
        w, h = (int(v) for v in offering.capabilities.default_size.split("x"))
        pipe(prompt="warm-up", height=h, width=w, num_inference_steps=2, output_type="latent")
    return pipe, family
