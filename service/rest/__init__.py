"""The REST transport: Open Inference Protocol V2 over HTTP (KServe/Triton REST).

:mod:`~service.rest.asgi` answers ``POST .../infer`` ahead of FastAPI (admit -> read and decode -> run ->
respond), :mod:`~service.rest.codec` is its JSON (and binary-framed) wire format, :mod:`~service.rest.app`
the FastAPI app for everything else (:mod:`~service.rest.routes`, :mod:`~service.rest.openapi`, the web page
of :mod:`~service.rest.webui`).
"""
