"""`imagebroker edit`: `generate` with input images: an init image (img2img), a mask (inpainting) and
reference images, routed, priced and recorded like any call; the same options and the same JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..types import ImageRequest
from .common import (
    AdapterOpt,
    AspectOpt,
    ControlOpt,
    ImageOpt,
    ImagePromptOpt,
    JsonOpt,
    LedgerOpt,
    MaskOpt,
    ModelOpt,
    NOpt,
    PolicyOpt,
    ResolutionOpt,
    SeedOpt,
    SizeOpt,
    StrengthOpt,
    TagOpt,
    control_fields,
    edit_fields,
    fail,
    handle_errors,
    request_fields,
    shape_fields,
)
from .generate import (
    EmbedOpt,
    FormatOpt,
    GuidanceOpt,
    NegativeOpt,
    NoStoreOpt,
    OutOpt,
    QualityOpt,
    SchedulerOpt,
    StepsOpt,
    TimeoutOpt,
    make_images,
    option_fields,
)


@handle_errors
def edit(
    prompt: Annotated[str, typer.Argument(help="What to make of the input images.")],
    image: ImageOpt = None, mask: MaskOpt = None, strength: StrengthOpt = None,
    size: SizeOpt = None, n: NOpt = 1, seed: SeedOpt = None, adapter: AdapterOpt = None,
    control: ControlOpt = None,
    image_prompt: ImagePromptOpt = None,
    model: ModelOpt = None, tag: TagOpt = None, policy: PolicyOpt = None, out: OutOpt = Path("."),
    negative: NegativeOpt = None, steps: StepsOpt = None, guidance: GuidanceOpt = None,
    scheduler: SchedulerOpt = None, quality: QualityOpt = None, output_format: FormatOpt = None,
    timeout: TimeoutOpt = None, embed_provenance: EmbedOpt = False, no_store: NoStoreOpt = False,
    aspect_ratio: AspectOpt = None, resolution: ResolutionOpt = None,
    ledger: LedgerOpt = None, json_out: JsonOpt = False,
) -> None:
    """Edit --image by PROMPT (with --mask: only where the mask is white), write the results into --out
    exactly as the provider sent them, and print offering, cost and latency. Without --size the result
    has the init image's size where the offering can make it."""
    if not image:
        fail("edit needs --image: the image to edit (repeat --image for reference images)")
    fields = (request_fields(size, n, seed, adapter, model, tag) | control_fields(control, image_prompt)
              | edit_fields(image, mask, strength)
              | shape_fields(aspect_ratio, resolution)
              | option_fields(negative, steps, guidance, scheduler, quality, output_format))
    request = ImageRequest(prompt=prompt, **fields)
    make_images(request, policy=policy, ledger=ledger, out=out, timeout=timeout, embed=embed_provenance,
                no_store=no_store, json_out=json_out)
