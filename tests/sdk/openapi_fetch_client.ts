// openapi-typescript's types with openapi-fetch against a running hypergen server
// (driven by tests/sdk/run_sdks.py). Usage: node out/openapi_fetch_client.js BASE_URL KEY
import createClient from "openapi-fetch";
import type { components, paths } from "./schema";

type ImagesResponse = components["schemas"]["ImagesResponse"];

declare const process: { argv: string[]; exit(code: number): never };
const [base, key] = process.argv.slice(2);
const prompt = "a photo of an astronaut riding a horse on mars";

function check(ok: boolean, what: string): void {
  if (!ok) throw new Error(`openapi-fetch: ${what}`);
}

/** Base64 to bytes (`atob` gives one char per byte). */
function fromBase64(b64: string): Uint8Array {
  return Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
}

function isPng(bytes: Uint8Array): boolean {
  const sig = [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a];
  return sig.every((b, i) => bytes[i] === b);
}

/** The JSON answer of a generation (its 200 may also be an event stream). */
function images(data: unknown): ImagesResponse {
  check(typeof data === "object" && data !== null && "created" in data, "a JSON answer");
  return data as ImagesResponse;
}

async function main(): Promise<void> {
  const client = createClient<paths>({
    baseUrl: base,
    headers: { Authorization: `Bearer ${key}` },
  });
  const health = await client.GET("/health");
  check(health.data?.status === "healthy", "healthy");
  const models = await client.GET("/v1/models");
  check(models.data?.object === "list" && models.data.data.length === 1, "one model");
  const loras = await client.GET("/v1/loras");
  check(loras.data?.enabled === false && loras.data.data.length === 0, "no LoRA directory");
  const b64 = await client.POST("/v1/images/generations", {
    body: { prompt, size: "64x64", num_inference_steps: 2, seed: 1 },
  });
  check(isPng(fromBase64(images(b64.data).data[0].b64_json ?? "")), "b64_json is a PNG");
  const url = await client.POST("/v1/images/generations", {
    body: { prompt, size: "64x64", num_inference_steps: 2, seed: 1, response_format: "url" },
  });
  const id = (images(url.data).data[0].url ?? "").split("/").pop() ?? "";
  const file = await client.GET("/v1/images/files/{id}", {
    params: { path: { id } },
    parseAs: "arrayBuffer",
  });
  check(file.response.status === 200 && file.data !== undefined, "the url answers");
  check(isPng(new Uint8Array(file.data as ArrayBuffer)), "the url serves a PNG");
  const bad = await client.POST("/v1/images/generations", {
    body: { prompt, size: "64x64", num_inference_steps: 5 },
  });
  check(bad.response.status === 400, `status ${bad.response.status}`);
  check(bad.error?.error.param === "num_inference_steps", `param ${bad.error?.error.param}`);
  check(bad.error?.error.message.includes("between 1 and 4") ?? false, "message");
  const anonymous = createClient<paths>({ baseUrl: base });
  const denied = await anonymous.GET("/v1/models");
  check(denied.response.status === 401, `status ${denied.response.status}`);
  check(denied.error?.error.code === "missing_api_key", `401 ${JSON.stringify(denied.error)}`);
  console.log("openapi-fetch OK");
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
