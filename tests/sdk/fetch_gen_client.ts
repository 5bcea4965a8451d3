// OpenAPI Generator's `typescript-fetch` client against a running hypergen server
// (driven by tests/sdk/run_sdks.py). Usage: node out/fetch_gen_client.js BASE_URL KEY
import {
  Configuration,
  ErrorResponseFromJSON,
  HealthApi,
  HealthStatus,
  ImagesApi,
  ModelsApi,
  ResponseError,
  ResponseFormat,
} from "./fetch-gen";

declare const process: { argv: string[]; exit(code: number): never };
const [base, key] = process.argv.slice(2);
const prompt = "a photo of an astronaut riding a horse on mars";

function check(ok: boolean, what: string): void {
  if (!ok) throw new Error(`typescript-fetch: ${what}`);
}

/** Base64 to bytes (`atob` gives one char per byte). */
function fromBase64(b64: string): Uint8Array {
  return Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
}

function isPng(bytes: Uint8Array): boolean {
  const sig = [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a];
  return sig.every((b, i) => bytes[i] === b);
}

/** The server's error object from a client error, as the generated types read it. */
async function errorOf(call: () => Promise<unknown>, status: number) {
  try {
    await call();
  } catch (e) {
    check(e instanceof ResponseError, `expected a ResponseError, got ${e}`);
    const response = (e as ResponseError).response;
    check(response.status === status, `status ${response.status}, expected ${status}`);
    return ErrorResponseFromJSON(await response.json()).error;
  }
  throw new Error(`typescript-fetch: no ${status}`);
}

async function main(): Promise<void> {
  const config = new Configuration({ basePath: base, accessToken: key });
  const health = await new HealthApi(config).health();
  check(health.status === HealthStatus.Healthy, "healthy");
  const models = await new ModelsApi(config).listModels();
  check(models.object === "list" && models.data.length === 1, "one model");
  const loras = await new ModelsApi(config).listLoras();
  check(loras.object === "list" && loras.enabled === false && loras.data.length === 0, "no LoRA directory");
  const images = new ImagesApi(config);
  const b64 = await images.createImage({
    imageGenerationRequest: { prompt, size: "64x64", numInferenceSteps: 2, seed: 1 },
  });
  check(isPng(fromBase64(b64.data[0].b64Json ?? "")), "b64_json is a PNG");
  const url = await images.createImage({
    imageGenerationRequest: {
      prompt, size: "64x64", numInferenceSteps: 2, seed: 1, responseFormat: ResponseFormat.Url,
    },
  });
  const id = (url.data[0].url ?? "").split("/").pop() ?? "";
  const file = await images.getImage({ id });
  check(isPng(new Uint8Array(await file.arrayBuffer())), "the url serves a PNG");
  const bad = await errorOf(
    () => images.createImage({
      imageGenerationRequest: { prompt, size: "64x64", numInferenceSteps: 5 },
    }),
    400,
  );
  check(bad.param === "num_inference_steps", `param ${bad.param}`);
  check(bad.message.includes("between 1 and 4"), `message ${bad.message}`);
  const anonymous = new ModelsApi(new Configuration({ basePath: base }));
  const denied = await errorOf(() => anonymous.listModels(), 401);
  check(denied.code === "missing_api_key" && denied.param === null, `401 ${JSON.stringify(denied)}`);
  console.log("typescript-fetch OK");
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
