"""Schemathesis hooks for tests/suite/schemathesis.rs: the few failures the schema
cannot rule out, each dropped only in its exact shape, with the reason.

Every other check (all of them, in the examples, coverage and fuzzing phases) must pass.
"""

import json

import schemathesis

# "Schema-valid request rejected" (positive_data_acceptance) is expected only for these
# refusals, which depend on something an OpenAPI 3.0 schema cannot state. Keyed by
# (method and path, the `param` the server's 400 names).
CANNOT_BE_STATED = {
    # A file on the server: a schema cannot list which adapter files exist.
    ("POST /v1/images/generations", "lora_path"): "names a file on the server",
    ("POST /v1/images/edits", "lora_path"): "names a file on the server",
    ("POST /v1/images/generations", "loras"): "names files on the server",
    # A prompt's `<lora:NAME:W>` tags name files on the server, as `loras` does, and its
    # chunks of 75 tokens (at most 8) depend on the model's tokenizer.
    ("POST /v1/images/generations", "prompt"): "LoRA tags name files; tokens per the model",
    ("POST /v1/images/edits", "prompt"): "LoRA tags name files; tokens per the model",
    ("POST /v1/images/generations", "negative_prompt"): "at most 8 chunks of the model's tokens",
    ("POST /v1/images/edits", "negative_prompt"): "at most 8 chunks of the model's tokens",
    # The loaded model's text encoders: a model with fewer layers takes less than 11.
    ("POST /v1/images/generations", "clip_skip"): "at most the model's layers less one",
    ("POST /v1/images/edits", "clip_skip"): "at most the model's layers less one",
    # ControlNets name files on the server and carry an image inside a string (base64),
    # with a cross-field rule (guidance_start < guidance_end).
    ("POST /v1/images/generations", "controlnets"): "names files on the server; a base64 image",
    ("POST /v1/images/edits", "controlnets"): "names files on the server, as JSON text",
    # Sampler settings depend on the sampler (the request's `scheduler`, or the model's
    # own when absent): `eta` is TCD's alone, LCM and TCD take no spacing and at most the
    # steps they were distilled on (50 for the usual configs).
    ("POST /v1/images/generations", "eta"): "only the tcd sampler takes eta",
    ("POST /v1/images/edits", "eta"): "only the tcd sampler takes eta",
    ("POST /v1/images/generations", "timestep_spacing"): "lcm and tcd take no spacing",
    ("POST /v1/images/edits", "timestep_spacing"): "lcm and tcd take no spacing",
    ("POST /v1/images/generations", "num_inference_steps"): "lcm/tcd: at most their distilled steps",
    ("POST /v1/images/edits", "num_inference_steps"): "lcm/tcd: at most their distilled steps",
    # In a form, `loras` is JSON text: a schema cannot state the JSON inside a string.
    ("POST /v1/images/edits", "loras"): "names files on the server, as JSON text",
    # The uploaded file's content: a schema can say "binary", not "a decodable PNG,
    # JPEG or WebP", nor the pixel size the file declares.
    ("POST /v1/images/edits", "image"): "the file must decode as an image",
    ("POST /v1/images/edits", "mask"): "the mask must decode and match the image's size",
    # Cross-field rules: `num_inference_steps × strength ≥ 1`; an absent `size` is the
    # image's own, which must fall within the server's limits.
    ("POST /v1/images/edits", "strength"): "num_inference_steps × strength must be ≥ 1",
    ("POST /v1/images/edits", "size"): "the image's own size must be within the limits",
}


def _param(response):
    try:
        return json.loads(response.content)["error"]["param"]
    except (ValueError, KeyError, TypeError):
        return None


def _form_text(failure, case):
    """Whether `failure` is a multipart text field "made" null or a number: a form field
    is text, and schemathesis sends null as the text `null` and a number as its digits,
    which a text field rightly takes as text (a form carries no JSON types)."""
    if getattr(failure, "code", None) != "ST201" or case.operation.path != "/v1/images/edits":
        return False
    text = " ".join(str(getattr(failure, a, "")) for a in ("title", "message", "description"))
    return "(was string, became" in text


@schemathesis.hook
def filter_failure(context, failure, case, response):
    """Keep every failure but the positive-data refusals listed above, and text form
    fields sent as `null` or digits."""
    if _form_text(failure, case):
        return False
    if getattr(failure, "code", None) != "ST202" or response.status_code != 400:
        return True
    key = (f"{case.operation.method.upper()} {case.operation.path}", _param(response))
    return key not in CANNOT_BE_STATED
