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
    # ControlNets name files on the server and carry an image inside a string (base64),
    # with a cross-field rule (guidance_start < guidance_end).
    ("POST /v1/images/generations", "controlnets"): "names files on the server; a base64 image",
    ("POST /v1/images/edits", "controlnets"): "names files on the server, as JSON text",
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


@schemathesis.hook
def filter_failure(context, failure, case, response):
    """Keep every failure but the positive-data refusals listed above."""
    if getattr(failure, "code", None) != "ST202" or response.status_code != 400:
        return True
    key = (f"{case.operation.method.upper()} {case.operation.path}", _param(response))
    return key not in CANNOT_BE_STATED
