// The official openai Node SDK against the gateway: node openai_client.mjs BASE_URL KEY INIT_PNG EDIT_MODEL
// Prints one JSON object of what each call answered, for tests/test_gateway_node.py to check.
import { readFileSync } from "node:fs";
import OpenAI, { toFile } from "openai";

const [baseURL, apiKey, initPng, editModel] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0 });
const out = {};

const { data: gen, response } = await client.images
  .generate({ prompt: "a lighthouse", size: "512x512" })
  .withResponse();
out.generate = {
  images: gen.data.length,
  b64_bytes: Buffer.from(gen.data[0].b64_json, "base64").length,
  offering: response.headers.get("x-imagebroker-offering"),
  cost_usd: response.headers.get("x-imagebroker-cost-usd"),
};

const image = await toFile(readFileSync(initPng), "init.png", { type: "image/png" });
const edit = await client.images.edit({ model: editModel, prompt: "bluer", image });
out.edit = { images: edit.data.length, offering: edit.imagebroker?.offering };

try {
  await client.images.generate({ prompt: "x", model: "no-such/model" });
  out.error = "none";
} catch (err) {
  out.error = { bad_request: err instanceof OpenAI.BadRequestError, status: err.status };
}

const stream = await client.images.generate({ prompt: "streamed", stream: true });
out.stream = [];
for await (const event of stream) out.stream.push(event.type);

console.log(JSON.stringify(out));
