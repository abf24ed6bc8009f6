"""The request body tritonclient.http would send, without sending it (its own encoder, an independent one)."""

from __future__ import annotations

import tritonclient.http as tc
from tritonclient.http._utils import _get_inference_request


def triton_body(
    inputs: list[tc.InferInput], outputs: list[tc.InferRequestedOutput] | None = None, **kw: object
) -> tuple[bytes, int | None]:
    body, header_length = _get_inference_request(
        inputs=inputs,
        request_id=kw.get("request_id", ""),
        outputs=outputs,
        sequence_id=0,
        sequence_start=False,
        sequence_end=False,
        priority=0,
        timeout=kw.get("timeout"),
        custom_parameters=None,
    )
    return (body if isinstance(body, bytes) else body.encode()), header_length
