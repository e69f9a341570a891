"""Random and mutated Label Studio payloads against /predict, /webhook and /setup: never a 500.

Mutations start from what Label Studio 1.23 really sent (tests/fixtures/ls-protocol) and drop keys, swap
types, put huge numbers, NaN, odd unicode and nested junk anywhere in the tree. Every answer must be
JSON; a 4xx carries an "error" string; the only 5xx allowed is a 503 with retry advice (the deadline
or models still loading). The app serves on a real Redis and fetches from the Label Studio stand-in.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend.cache.store import make_store
from backend.config import Settings
from backend.http.server import create_app
from backend.inference.local import Predictor
from tests.assets import recorded

settings.register_profile(
    "fuzz", max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
# CI replays the same examples every run, so a red CI can be reproduced; local runs explore anew.
settings.register_profile("fuzz-ci", settings.get_profile("fuzz"), derandomize=True)
FUZZ = settings.get_profile("fuzz-ci" if os.environ.get("CI") else "fuzz")

PREDICT_PAYLOADS = [
    "03-predict-batch.json",
    "03a-predict-on-task-open.json",
    "04-predict-interactive-keypoints.json",
    "05-predict-interactive-rectangle.json",
    "06-predict-interactive-text.json",
]
WEBHOOK_PAYLOADS = [
    "07-webhook-annotation-created.json",
    "08-webhook-annotation-updated.json",
    "09-webhook-annotations-deleted.json",
    "10-webhook-start-training.json",
]
TRIED: Counter[str] = Counter()

huge_numbers = st.sampled_from([10**400, -(10**400), 10**309, 2**63, 2**64 + 1, 1e308, -1e308, 5e-324, 0, -1])
odd_text = st.sampled_from(
    ["", " ", "\x00", "\ud800", "\U0001f697", "Car\u200b", "ß" * 1000, "../../etc/passwd", "%00"]
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    huge_numbers,
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    odd_text,
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12) | odd_text, inner, max_size=5),
    max_leaves=25,
)


def paths_of(tree: object, prefix: tuple = ()) -> list[tuple]:
    """Every place in a JSON tree, as a tuple of keys and indices from the root."""
    found = [prefix]
    if isinstance(tree, dict):
        for key, value in tree.items():
            found += paths_of(value, (*prefix, key))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            found += paths_of(value, (*prefix, index))
    return found


def mutate(tree: object, path: tuple, kind: str, junk: object) -> object:
    if not path:
        return junk if kind != "wrap" else [tree]
    parent = tree
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    if kind == "drop":
        del parent[last]
    elif kind == "replace":
        parent[last] = junk
    elif kind == "wrap":
        parent[last] = [parent[last]] if not isinstance(parent[last], list) else {"value": parent[last]}
    elif kind == "repeat" and isinstance(parent[last], list):
        parent[last] = parent[last] * 30
    elif kind == "stringify":
        parent[last] = json.dumps(parent[last], allow_nan=True)
    return tree


def value_at(tree: object, path: tuple) -> object:
    for step in path:
        tree = tree[step]
    return tree


def junk_like(value: object) -> st.SearchStrategy:
    """Junk that is most likely to slip past a check written for `value`'s type."""
    if isinstance(value, bool):
        return st.one_of(st.integers(-1, 2), st.none(), st.sampled_from(["false", "true", ""]))
    if isinstance(value, (int, float)):
        return st.one_of(huge_numbers, st.floats(), st.booleans(), st.integers(), st.text(max_size=5), st.none())
    if isinstance(value, str):
        return st.one_of(odd_text, st.text(max_size=40), huge_numbers, st.none(), st.lists(st.text(max_size=5)))
    return json_values


def read_by_the_backend(path: tuple) -> bool:
    """Where Label Studio's payloads hold what the backend reads; mutations land there most of the time."""
    return (
        path[:2] == ("params", "context")
        or (path[:1] == ("tasks",) and len(path) >= 3 and path[2] in ("data", "id"))
        or path[:1] in (("label_config",), ("project",), ("action",), ("tasks",), ("params",))
        or path[:2] in (("annotation", "result"), ("task", "data"), ("project", "id"))
    )


@st.composite
def mutated(draw, names: list[str]) -> object:
    body = recorded(draw(st.sampled_from(names)))
    for _ in range(draw(st.integers(1, 3))):
        candidates = paths_of(body)
        focused = [path for path in candidates if read_by_the_backend(path)]
        path = draw(st.sampled_from(focused if focused and draw(st.integers(0, 3)) else candidates))
        kind = draw(st.sampled_from(["drop", "replace", "replace", "replace", "wrap", "repeat", "stringify"]))
        if kind == "drop" and not path:
            kind = "replace"
        body = mutate(body, path, kind, draw(junk_like(value_at(body, path))))
    return body


# Mostly plausible values, so that one junk field is not always stopped by an earlier check.
plausible = st.floats(0, 100)
numbers = st.one_of(plausible, plausible, plausible, huge_numbers, st.floats(), st.booleans(), st.text(max_size=4))
labels = st.one_of(
    st.just(["Car"]), st.just(["Car"]), st.lists(st.one_of(odd_text, st.integers(), st.none()), max_size=3), json_values
)


@st.composite
def regions(draw) -> dict:
    """One smart region as Label Studio's frontend shapes it, with any field swapped for junk."""
    kind = draw(st.sampled_from(["keypointlabels", "keypointlabels", "rectanglelabels", "textarea"]) | scalars)
    value = {
        "x": draw(numbers),
        "y": draw(numbers),
        "width": draw(numbers),
        "height": draw(numbers),
        "rotation": draw(numbers),
        "keypointlabels": draw(labels),
        "rectanglelabels": draw(labels),
        "labels": draw(labels),
        "text": draw(labels),
    }
    for key in draw(st.lists(st.sampled_from(sorted(value)), max_size=2)):
        value.pop(key, None)
    region = {"id": draw(scalars), "type": kind, "value": value, "is_positive": draw(scalars), "from_name": "tag2"}
    for key in draw(st.lists(st.sampled_from(["id", "is_positive", "from_name"]), max_size=3)):
        region.pop(key, None)
    return region


@pytest.fixture(scope="module")
def fuzz_client(sam_checkpoint, label_studio, redis_server, tmp_path_factory):
    configured = Settings(
        label_studio_url=label_studio.url,
        label_studio_api_key=label_studio.legacy_token,
        allowed_image_hosts=("localhost",),
        allow_private_image_hosts=True,
        sam_checkpoint=str(sam_checkpoint),
        redis_url=redis_server.url,
        model_dir=str(tmp_path_factory.mktemp("fuzz-models")),
        predict_deadline_s=20.0,
    )
    predictor = Predictor(configured, make_store(configured.redis_url, configured.memory_cache_bytes))
    client = create_app(configured, predictor).test_client()
    predictor.models.get(120)
    yield client
    print(f"\nfuzz inputs tried: {dict(TRIED)} total {sum(TRIED.values())}")


def check_answer(response, path: str, body: object) -> None:
    assert response.status_code != 500, response.get_data(as_text=True)[:500]
    answer = json.loads(response.get_data(as_text=True))
    if response.status_code >= 400:
        assert isinstance(answer, dict) and isinstance(answer.get("error"), str) and answer["error"], answer
        assert response.status_code < 500 or (response.status_code == 503 and response.headers.get("Retry-After"))
    elif path == "/predict":
        assert len(answer["results"]) == len(body["tasks"])
        for entry in answer["results"]:
            assert entry == [] or isinstance(entry["result"], list)


def post(client, path: str, body: object, kind: str):
    TRIED[kind] += 1
    response = client.post(path, data=json.dumps(body, allow_nan=True), content_type="application/json")
    check_answer(response, path, body)
    return response


@FUZZ
@given(body=mutated(PREDICT_PAYLOADS))
def test_mutated_predict_payloads(fuzz_client, body):
    post(fuzz_client, "/predict", body, "predict-mutated")


@FUZZ
@given(context=st.lists(regions(), max_size=6), task_id=scalars)
def test_generated_smart_regions(fuzz_client, context, task_id):
    body = recorded("04-predict-interactive-keypoints.json")
    body["params"]["context"] = {"result": context}
    body["tasks"][0]["id"] = task_id
    post(fuzz_client, "/predict", body, "predict-regions")


@settings(FUZZ, max_examples=60)
@given(body=json_values)
def test_random_predict_payloads(fuzz_client, body):
    post(fuzz_client, "/predict", body, "predict-random")


@FUZZ
@given(body=mutated(WEBHOOK_PAYLOADS))
def test_mutated_webhook_payloads(fuzz_client, body):
    post(fuzz_client, "/webhook", body, "webhook-mutated")


@settings(FUZZ, max_examples=60)
@given(body=json_values)
def test_random_webhook_payloads(fuzz_client, body):
    post(fuzz_client, "/webhook", body, "webhook-random")


@settings(FUZZ, max_examples=40)
@given(body=mutated(["02-setup.json"]))
def test_mutated_setup_payloads(fuzz_client, body):
    post(fuzz_client, "/setup", body, "setup-mutated")


@settings(FUZZ, max_examples=60)
@given(
    raw=st.binary(max_size=300) | st.text(max_size=300).map(str.encode),
    path=st.sampled_from(["/predict", "/webhook", "/setup"]),
)
def test_raw_bytes_are_refused_as_json_errors(fuzz_client, raw, path):
    TRIED["raw-bytes"] += 1
    response = fuzz_client.post(path, data=raw, content_type="application/json")
    check_answer(response, path, None)


@pytest.mark.parametrize("path", ["/predict", "/webhook", "/setup"])
@pytest.mark.parametrize("raw", ["[" * 100_000, '{"a":' * 50_000, "1" * 5000, '"\\ud800"'])
def test_pathological_json_is_a_400(fuzz_client, path, raw):
    TRIED["pathological"] += 1
    response = fuzz_client.post(path, data=raw, content_type="application/json")
    check_answer(response, path, None)
    assert response.status_code == 400


def _billion_laughs(config: str) -> str:
    entities = "".join(f'<!ENTITY lol{i} "{("&lol%s;" % (i - 1 if i > 1 else "")) * 10}">' for i in range(1, 10))
    doctype = f'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">{entities}]>'
    return doctype + config.replace('value="$image"', 'value="$image" title="&lol9;"')


def _set(path: tuple, value: object):
    def change(body: dict) -> dict:
        value_at(body, path[:-1])[path[-1]] = value(body) if callable(value) else value
        return body

    return change


KEYPOINT_VALUE = ("params", "context", "result", 0, "value")


@pytest.mark.parametrize(
    ("change", "status"),
    [
        (_set((*KEYPOINT_VALUE, "x"), 10**400), 400),  # was a 500: OverflowError converting to float
        (_set((*KEYPOINT_VALUE, "keypointlabels"), ["\ud800"]), 422),  # was a 500: unencodable Redis key
        (_set(("tasks", 0, "id"), "\ud800" * 3), 200),  # was a 500: unencodable Redis key
        (_set(("tasks", 0, "id"), "t" * 100_000), 200),
        (_set(("label_config",), lambda body: _billion_laughs(body["label_config"])), 422),
        (_set(("label_config",), ["<View/>"]), 422),
        (_set(("project",), ["not", "a", "project"]), 200),
    ],
    ids=["huge-int", "surrogate-label", "surrogate-task-id", "long-task-id", "xml-bomb", "config-list", "project"],
)
def test_inputs_the_fuzzer_found(fuzz_client, change, status):
    TRIED["regressions"] += 1
    body = change(recorded("04-predict-interactive-keypoints.json"))
    response = fuzz_client.post("/predict", data=json.dumps(body), content_type="application/json")
    check_answer(response, "/predict", body)
    assert response.status_code == status, response.get_data(as_text=True)[:300]
