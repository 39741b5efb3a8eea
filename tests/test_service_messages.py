"""Error answers a new user meets first: each names what the user sent and what to do instead; the
X-Request-Timeout header is bounded in the schema; schemathesis against the running server finds no 5xx."""

from __future__ import annotations

import base64
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import (
    CASE_LIMITS,
    png_bytes,
    running_server,
    serve,
)

RAW = {"content-type": "image/png"}
ROUTES = ("/embed", "/reconstruct", "/segment", "/detect")


@pytest.fixture(scope="module")
def client(dense_bundle: Path):
    with serve(dense_bundle, **CASE_LIMITS) as c:
        yield c


def _error(r, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code, err
    return str(err["message"])


def test_single_image_json_errors_name_the_key_sent(client) -> None:
    msg = _error(client.post("/embed", json={"image": "not base64!"}), 400, "bad_base64")
    assert msg.startswith("image:") and "images[" not in msg
    msg = _error(client.post("/reconstruct", json={"image": "not base64!"}), 400, "bad_base64")
    assert msg.startswith("image:")
    # the list form still names the index
    assert _error(client.post("/embed", json={"images": ["x!"]}), 400, "bad_base64").startswith("images[0]:")


@pytest.mark.parametrize("route,field", [("/embed", "pooling"), ("/reconstruct", "mask_ratio"),
                                         ("/detect", "score_threshold")])  # fmt: skip
def test_a_query_option_sent_as_form_field_says_it_is_a_query_parameter(
    client, route: str, field: str
) -> None:
    r = client.post(route, files={"file": ("a.png", png_bytes(), "image/png")}, data={field: "0.5"})
    msg = _error(r, 400, "bad_multipart")
    assert "query parameter" in msg and f"{route}?{field}=" in msg, msg
    # a field that is no option keeps the plain message
    r = client.post(route, files={"file": ("a.png", png_bytes(), "image/png")}, data={"colour": "red"})
    assert "query parameter" not in _error(r, 400, "bad_multipart")


def test_too_small_states_the_minimum_side(client) -> None:
    msg = _error(client.post("/embed", content=png_bytes(8, 8), headers=RAW), 422, "image_too_small")
    assert "8x8" in msg and "16 px" in msg, msg


@pytest.mark.parametrize("route", ROUTES)
def test_an_unacceptable_accept_header_is_406(client, route: str) -> None:
    r = client.post(route, content=png_bytes(), headers={**RAW, "accept": "text/csv"})
    msg = _error(r, 406, "not_acceptable")
    assert "text/csv" in msg and ("application/json" in msg or "image/png" in msg)
    # wildcards and the route's own types still work
    ok = client.post(route, content=png_bytes(), headers={**RAW, "accept": "text/csv, */*;q=0.1"})
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("value", ["5e-324", "0", "-1", "0.5", "nan", "inf", "1e9", "soon"])
@pytest.mark.parametrize("route", ROUTES)
def test_request_timeout_out_of_range_is_422(client, route: str, value: str) -> None:
    r = client.post(route, content=png_bytes(), headers={**RAW, "x-request-timeout": value})
    msg = _error(r, 422, "invalid_option")
    assert "x-request-timeout" in msg


def test_request_timeout_is_bounded_in_the_schema(client) -> None:
    api = client.get("/openapi.json").json()
    for route in ROUTES:
        (param,) = [p for p in api["paths"][route]["post"]["parameters"] if p["name"] == "x-request-timeout"]
        (number,) = [s for s in param["schema"]["anyOf"] if s.get("type") == "number"]
        assert number["minimum"] >= 1 and number["maximum"] <= 3600, number
    ok = client.post("/embed", content=png_bytes(), headers={**RAW, "x-request-timeout": "2.5"})
    assert ok.status_code == 200


def test_json_body_example_is_an_image_every_route_accepts(client) -> None:
    api = client.get("/openapi.json").json()
    for route in ROUTES:
        example = api["paths"][route]["post"]["requestBody"]["content"]["application/json"]["example"]
        r = client.post(route, json=example)
        assert r.status_code == 200, (route, r.text)
        assert base64.b64decode(example.get("image") or example["images"][0])[:4] == b"\x89PNG"


schemathesis = pytest.importorskip("schemathesis")


@pytest.mark.slow
def test_schemathesis_against_the_running_server_finds_no_server_error(
    dense_bundle: Path, tmp_path: Path
) -> None:
    """The issue's check: schemathesis' CLI on the running service's own OpenAPI, every phase (examples,
    coverage, fuzzing, stateful), 40 examples per operation, fixed seed; any 5xx fails it."""
    with running_server(dense_bundle, tmp_path / "server.log") as server:
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "schemathesis.cli",
                "run",
                f"{server.url}/openapi.json",
                "--max-examples",
                "40",
                "--phases",
                "examples,coverage,fuzzing,stateful",
                "--checks",
                "not_a_server_error",
                "--seed",
                "1",
                "--workers",
                "1",
                "--no-color",
            ],  # fmt: skip
            capture_output=True,
            text=True,
            timeout=900,
            cwd=tmp_path,  # the CLI writes a .schemathesis/ folder where it runs
        )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    assert re.search(r"Stateful \(in .*?\)\s+Scenarios:\s+[1-9]", out), out[-3000:]
    m = re.search(r"(\d+) generated, (\d+) passed", out)
    assert m and m.group(1) == m.group(2) and int(m.group(1)) >= 40 * 9, out[-3000:]
