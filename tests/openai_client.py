"""OpenAI's official Python client against a running hypergen server.

Usage: python3 tests/openai_client.py BASE_URL API_KEY [EDIT_JSON]

With EDIT_JSON (`{"image", "mask", "prompt", "size", "extra", "out"}`), also edits the
image with `images.edit(image=…, mask=…)` and writes the returned PNG to `out` for the
caller to compare with diffusers' reference.

Lists the models, generates images as b64_json and as url with hypergen's extra
fields passed through `extra_body`, decodes the PNGs, streams one with
`stream=True, partial_images=2` (two partial events, then the completed image, which
must equal the non-streamed answer), and checks that errors arrive
as the client's typed exceptions with `param` and `code`. Prints "openai client OK".
The server must serve the tiny fixture (64x64 images are within its limits).
"""

import base64
import struct
import sys
import urllib.request

import openai

PROMPT = "a photo of an astronaut riding a horse on mars"
FAST = {"num_inference_steps": 2, "seed": 1}


def png_size(data: bytes) -> tuple:
    """Width and height from a PNG's IHDR chunk (no imaging library needed)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR", "no IHDR chunk"
    return struct.unpack(">II", data[16:24])


def main() -> None:
    base, key = sys.argv[1], sys.argv[2]
    client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)

    models = client.models.list()
    assert len(models.data) == 1, models
    print("model:", models.data[0].id)

    result = client.images.generate(
        model="dall-e-3",
        prompt=PROMPT,
        n=2,
        size="64x64",
        response_format="b64_json",
        extra_body=FAST,
    )
    assert len(result.data) == 2, result
    for image in result.data:
        png = base64.b64decode(image.b64_json)
        assert png_size(png) == (64, 64), png_size(png)
        assert image.revised_prompt == PROMPT
    print("b64_json: 2 PNGs of 64x64")

    result = client.images.generate(
        prompt=PROMPT, size="64x64", response_format="url", extra_body=FAST
    )
    url = result.data[0].url
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request) as response:
        assert response.headers["Content-Type"] == "image/png"
        assert png_size(response.read()) == (64, 64)
    print("url:", url)

    # Streaming: two partial images, then the completed one, equal to the plain answer.
    streamed = {"num_inference_steps": 3, "seed": 5}
    events = list(
        client.images.generate(
            prompt=PROMPT,
            size="64x64",
            stream=True,
            partial_images=2,
            extra_body=streamed,
        )
    )
    types = [e.type for e in events]
    assert types == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ], types
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    plain = client.images.generate(
        prompt=PROMPT, size="64x64", response_format="b64_json", extra_body=streamed
    )
    assert base64.b64decode(events[2].b64_json) == base64.b64decode(
        plain.data[0].b64_json
    ), "the streamed image differs from the plain one"
    print("stream: 2 partial images, then the completed image")

    try:
        client.images.generate(prompt=PROMPT, size="63x64")
        raise AssertionError("a bad size was accepted")
    except openai.BadRequestError as e:
        assert e.param == "size" and e.code == "invalid_value", e.body
    try:
        client.images.generate(prompt=PROMPT, n=11, size="64x64")
        raise AssertionError("n=11 was accepted")
    except openai.BadRequestError as e:
        assert e.param == "n", e.body
    wrong = openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0)
    try:
        wrong.models.list()
        raise AssertionError("a wrong key was accepted")
    except openai.AuthenticationError as e:
        assert e.code == "invalid_api_key", e.body
    print("errors: typed, with param and code")

    if len(sys.argv) > 3:
        import json

        edit = json.loads(sys.argv[3])
        with open(edit["image"], "rb") as image, open(edit["mask"], "rb") as mask:
            result = client.images.edit(
                image=image,
                mask=mask,
                prompt=edit["prompt"],
                size=edit["size"],
                response_format="b64_json",
                extra_body=edit["extra"],
            )
        with open(edit["out"], "wb") as out:
            out.write(base64.b64decode(result.data[0].b64_json))
        print("edit: written to", edit["out"])
    print("openai client OK")


if __name__ == "__main__":
    main()
