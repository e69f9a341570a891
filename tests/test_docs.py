"""The reference documents cannot drift from the code: docs/http-api.md names every route of the Flask app and no
other, and the README's label config is label_config.xml."""

from __future__ import annotations

import re

from backend.cache.store import MemoryStore
from backend.http.server import create_app
from backend.inference.local import Predictor
from tests.assets import REPO

HEADING = re.compile(r"^### `([A-Z]+) (/[^`]*)`$", re.MULTILINE)


def test_the_http_api_reference_names_every_route_and_no_other(settings):
    app = create_app(settings, Predictor(settings, MemoryStore(1 << 20)))
    routes = {
        (method, rule.rule)
        for rule in app.url_map.iter_rules()
        if rule.endpoint != "static"
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
    documented = set(HEADING.findall((REPO / "docs" / "http-api.md").read_text()))
    assert routes - documented == set(), "routes without a heading in docs/http-api.md"
    assert documented - routes == set(), "headings in docs/http-api.md naming no route"


def test_the_readme_label_config_is_label_config_xml():
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```xml\n(.*?)```", readme, re.DOTALL)
    assert (REPO / "label_config.xml").read_text() in blocks
