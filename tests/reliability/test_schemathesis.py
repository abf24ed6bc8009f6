"""Schemathesis on every operation of the service's OpenAPI schema (/openapi.json): no server error, ever.

Bounded: 12 examples per operation (positive and negative generation), each sent twice, with a fixed seed
(``derandomize``), so a failure is a regression, not luck.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, settings

from service.server import create_app
from service.settings import Settings
from tests.support.servers import InThread

try:
    import schemathesis
    from schemathesis.checks import positive_data_acceptance
except ImportError:  # a missing dev dependency fails this one test, not the whole collection
    schemathesis = None

#: The schema the server publishes at /openapi.json (test_the_schema_is_the_served_one checks they agree).
SCHEMA = create_app(Settings()).app.openapi()


def test_the_schema_is_the_served_one(server: InThread) -> None:
    r = httpx.get(server.url + "/openapi.json", timeout=30)
    assert r.status_code == 200 and r.json() == json.loads(json.dumps(SCHEMA))


if schemathesis is None:

    def test_schemathesis_is_installed() -> None:
        pytest.fail("schemathesis is not installed: it is in the dev extra (pip install -e '.[dev]')")

else:
    API = schemathesis.openapi.from_dict(SCHEMA)

    @API.parametrize()
    @settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    def test_every_operation_fuzzed_by_schemathesis_gives_no_server_error(case: Any, server: InThread) -> None:
        """Each generated case twice: as generated (random names: 404 paths), and aimed at the real model
        ``digits`` (so bodies reach the parser and the model; never an unload, which would take it from the other
        tests sharing this server). Schemathesis' checks run on every answer, except
        ``positive_data_acceptance``: a schema-valid body can still be refused for what a JSON schema cannot say
        (an ``Inference-Header-Content-Length`` that does not match the body, a tensor that does not fit)."""
        url = server.url
        response = case.call(base_url=url, timeout=30)
        assert response.status_code < 500, (case.method, case.formatted_path, response.status_code, response.text)
        case.validate_response(response, excluded_checks=[positive_data_acceptance])
        if case.path_parameters and "model_name" in case.path_parameters and not case.path.endswith("/unload"):
            case.path_parameters["model_name"] = "digits"
            if "model_version" in case.path_parameters:
                case.path_parameters["model_version"] = "1"
            response = case.call(base_url=url, timeout=30)
            assert response.status_code < 500, (case.method, case.formatted_path, response.status_code, response.text)
            case.validate_response(response, excluded_checks=[positive_data_acceptance])
