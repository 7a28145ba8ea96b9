"""Azure OpenAI image deployments: `POST https://{resource}.openai.azure.com/openai/deployments/{deployment}/
images/generations?api-version=...` with the `api-key` header; edits are multipart on `/images/edits` (as
OpenAI's: `image[]` parts, a mask whose transparent pixels are changed). Set `providers.azure.options.
resource` (or `base_url`), `deployments: {model: deployment}` where a deployment is not named after its
model, and `region` to the resource's region (swedencentral, eastus2, ...): the region is the offering's.
gpt-image models answer base64 only, with token `usage` as OpenAI reports it; content-filter refusals are
400s (`contentFilter`, `content_policy_violation`, inner `ResponsibleAIPolicyViolation`)."""

from __future__ import annotations

from typing import Any

from ..types import ImageRequest
from .offering import Offering
from .openai import OpenAIProvider

API_VERSION = "2025-04-01-preview"   # the version that added gpt-image-1 (learn.microsoft.com)


class AzureProvider(OpenAIProvider):
    """OpenAI's wire format (multipart edits, usage) on Azure's URLs, key header and deployments."""

    name = "azure"
    api_key_env = "AZURE_OPENAI_API_KEY"
    default_base_url = None

    def headers(self, key: str | None) -> dict[str, str]:
        return {"api-key": key} if key else {}

    @property
    def base_url(self) -> str | None:
        resource = self.settings.options.get("resource")
        return super().base_url or (f"https://{resource}.openai.azure.com" if resource else None)

    def availability(self, offering: Offering) -> str | None:
        if self.base_url_for(offering) is None:
            return "no Azure resource: set providers.azure.options.resource (or base_url)"
        return super().availability(offering)

    def url(self, request: ImageRequest, offering: Offering) -> str:
        deployment = (self.settings.options.get("deployments") or {}).get(offering.model, offering.model)
        version = self.settings.options.get("api_version", API_VERSION)
        path = "images/edits" if request.is_edit else "images/generations"
        return f"{self.base_url_for(offering)}/openai/deployments/{deployment}/{path}?api-version={version}"

    def body(self, request: ImageRequest, offering: Offering, size: tuple[int, int]) -> dict[str, Any]:
        body: dict[str, Any] = {"prompt": request.prompt, "n": request.n, "size": f"{size[0]}x{size[1]}"}
        if request.quality:
            body["quality"] = request.quality
        if request.background:
            body["background"] = request.background
        if request.output_format and not offering.model.startswith("dall-e"):
            body["output_format"] = request.output_format
        if offering.model.startswith("dall-e"):
            body["response_format"] = "b64_json"
        return body
