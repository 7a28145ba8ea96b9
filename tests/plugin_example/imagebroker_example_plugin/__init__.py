"""A third-party provider: paints every image one colour. Registered through the same entry-point
group as imagebroker's built-ins."""

from imagebroker.providers.base import CallContext, Provider, ProviderResult, RawImage
from imagebroker.testing.images import make_image


class ExampleProvider(Provider):
    name = "example"
    api_key_env = "EXAMPLE_API_KEY"
    catalog_file = "catalog.yaml"   # its offerings, shipped beside it

    async def generate(self, request, offering, ctx: CallContext) -> ProviderResult:
        w, h = request.width or 64, request.height or 64
        images = [RawImage(make_image(w, h, seed=i, prompt="example"), i) for i in range(request.n)]
        return ProviderResult(images, {"images": request.n, "width": w, "height": h}, "ex-1",
                              {"painted_by": "example"})
