"""The reference documents cannot drift from the code: docs/http-api.md names every route of the Flask app and no
other, its statuses and fields are what the server answers, the README's label config is label_config.xml, its
commands and settings are the CLI's and the settings', and the figures the docs quote are what the code gives."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import replace

import pytest
import redis

from backend.cache.store import MemoryStore
from backend.cli import main as cli_main
from backend.config import Settings, shown_default
from backend.http.server import create_app
from backend.inference.local import Predictor
from backend.inference.queue import QueuePredictor
from tests.assets import REPO, cached_embedding_bytes, recorded
from tests.conftest import make_client

README = REPO / "README.md"

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


# --- figures and answers the docs quote, against what the code and the server give ----------------------------


def section(document: str, heading: str) -> str:
    """The text of `document` from the heading line `heading` to the next heading of any level."""
    text = (REPO / document).read_text()
    start = text.index(heading + "\n") + len(heading) + 1
    following = re.search(r"^#{1,6} ", text[start:], re.MULTILINE)
    return text[start : start + following.start()] if following else text[start:]


def bullet(text: str, status: int) -> str:
    """The `- **<status>** ...` item of a route's answers, up to the next item."""
    found = re.search(rf"^- \*\*{status}\*\*(.*?)(?=^- |\Z)", text, re.MULTILINE | re.DOTALL)
    assert found, f"no **{status}** item"
    return " ".join(found.group(1).split())


def test_the_bytes_an_embedding_costs_are_what_the_cache_stores(settings):
    """The docs quote a SAM embedding's size for a 1024×768 image: the entry the cache stores for one."""
    stored = f"{cached_embedding_bytes(settings, 768, 1024):,}"
    quoted = {
        name: re.findall(r"\b2,097,\d{3}\b", (REPO / name).read_text())
        for name in ("docs/architecture.md", "docs/benchmarks.md", "docs/scaling.md")
    }
    assert all(quoted.values()), quoted
    assert {figure for figures in quoted.values() for figure in figures} == {stored}


def test_the_readme_names_every_command_of_the_cli(capsys):
    with pytest.raises(SystemExit):
        cli_main(["--help"])
    commands = set(re.search(r"\{([a-z,-]+)\}", capsys.readouterr().out).group(1).split(","))
    named = re.search(r"`python -m backend --help` lists the other commands \(([^)]*)\)", README.read_text())
    assert named, "the README's sentence on `python -m backend --help` is gone"
    assert set(re.findall(r"`([a-z-]+)`", named.group(1))) == commands - {"serve"}


def test_the_readme_settings_table_shows_each_default_and_every_choice():
    by_env = {definition.metadata["env"]: definition for definition in dataclasses.fields(Settings)}
    rows = re.findall(r"^\| (`[A-Z_]+`(?:, `[A-Z_]+`)*) \| ([^|]+) \| ([^|]+) \|$", README.read_text(), re.MULTILINE)
    assert len(rows) >= 8
    for names, defaults, meaning in rows:
        envs = re.findall(r"`([A-Z_]+)`", names)
        shown = (
            defaults.strip().split(", ")
            if len(envs) > 1 and defaults.strip() != "–"
            else [defaults.strip()] * len(envs)
        )
        for env, default in zip(envs, shown, strict=True):
            definition = by_env[env]
            assert default == shown_default(definition.default).strip("`"), env
            choices = definition.metadata["choices"]
            listed = set(re.findall(r"`([a-z0-9_.-]+)`", meaning)) & set(choices)
            if listed:
                assert listed == set(choices), f"the README lists some of {env}'s values, not all"


def test_the_redis_keys_table_names_every_key_the_code_writes():
    """Every `sam:` key the backend spells (its fixed part, before the first variable) is in scaling.md's table."""
    table = section("docs/scaling.md", "### Keys")
    spelled = set()
    for path in (REPO / "backend").rglob("*.py"):
        for key in re.findall(r"\"(sam:[^\"]*)\"", path.read_text()):
            spelled.add(re.split(r"[{<]", key)[0])
    assert {key for key in spelled if f"`{key}" not in table} == set()


def test_health_in_queue_mode_names_the_queues_it_counts(settings, queue_redis):
    queue_settings = replace(settings, inference="queue", redis_url=queue_redis.url)
    app = create_app(queue_settings, QueuePredictor(queue_settings, redis.Redis.from_url(queue_redis.url)))
    health = app.test_client().get("/health").json
    documented = re.search(
        r"`\"queued\"` \(jobs waiting per queue: ([^)]*)\)",
        bullet(section("docs/http-api.md", "### `GET /health`"), 200),
    )
    assert documented, "the /health item on `queued` is gone"
    assert set(re.findall(r"`([a-z-]+)`", documented.group(1))) == set(health["queued"])


def controls_named(text: str) -> set[str]:
    return set(re.findall(r"\b(?:Brush|Polygon|Rectangle|KeyPoint)Labels\b", text))


OUTPUT_CONTROLS = {
    "BrushLabels": '<BrushLabels name="tag" toName="image"><Label value="Car"/></BrushLabels>',
    "PolygonLabels": '<PolygonLabels name="tag" toName="image"><Label value="Car"/></PolygonLabels>',
    "RectangleLabels": '<RectangleLabels name="tag" toName="image"><Label value="Car"/></RectangleLabels>',
}
CLICKS = '<KeyPointLabels name="tag2" toName="image" smart="true"><Label value="Car"/></KeyPointLabels>'


def config_with(*controls: str) -> str:
    return f'<View><Image name="image" value="$image"/>{CLICKS}{"".join(controls)}</View>'


def test_the_documented_controls_a_config_needs_are_the_servers(client):
    """/setup's and /predict's 422 items name the controls the backend answers in: a config with any one of them
    is accepted for /setup and for a click, one with none answers 422 naming the same controls."""
    setup_item = bullet(section("docs/http-api.md", "### `POST /setup`"), 422)
    predict_item = bullet(section("docs/http-api.md", "### `POST /predict`"), 422)
    refused = client.post("/setup", json={"schema": config_with()})
    assert refused.status_code == 422
    answered_in = controls_named(refused.json["error"])
    assert answered_in == set(OUTPUT_CONTROLS)
    assert controls_named(setup_item) == answered_in, setup_item
    click_clause = re.search(r"a context or pre-annotation with a config that has [^;]*", predict_item)
    assert click_clause and controls_named(click_clause.group(0)) == answered_in, predict_item
    security_row = re.search(
        r"^\| a label config that is missing.*$", (REPO / "docs" / "security.md").read_text(), re.M
    )
    assert security_row and controls_named(security_row.group(0)) == answered_in, security_row
    for name, control in OUTPUT_CONTROLS.items():
        assert client.post("/setup", json={"schema": config_with(control)}).status_code == 200, name
        body = recorded("04-predict-interactive-keypoints.json")
        body["label_config"] = config_with(control)
        assert client.post("/predict", json=body).status_code == 200, name
    body = recorded("04-predict-interactive-keypoints.json")
    body["label_config"] = config_with()
    assert client.post("/predict", json=body).status_code == 422


def test_a_run_that_is_going_on_answers_409_with_the_documented_fields(settings, label_studio):
    """Runs of both kinds answer alike (docs/http-api.md says so of `/encode`): an encoding run needs no detector."""
    client, _ = make_client(settings)
    project = label_studio.add_project(recorded("03-predict-batch.json")["label_config"], ["/data/upload/1/voc.jpg"])
    label_studio.stalls[f"/api/projects/{project}/"] = 3.0
    try:
        started = client.post("/encode", query_string={"project": project})
        assert started.status_code == 202, started.json
        again = client.post("/encode", query_string={"project": project})
    finally:
        label_studio.stalls.clear()
        client.delete("/encode", query_string={"project": project})
    assert again.status_code == 409, again.json
    answers = section("docs/http-api.md", "### `POST /preannotate`")
    item = bullet(answers, 409)
    assert set(re.findall(r"\"(\w+)\":", item.split("`")[1])) == set(again.json), item
    assert f'`"state": "{again.json["progress"]["state"]}"`' in item
    progress = re.search(r"^Progress: `(\{.*?\})`", answers, re.MULTILINE | re.DOTALL)
    assert progress, "the progress fields of docs/http-api.md are gone"
    assert set(re.findall(r"\"(\w+)\":", progress.group(1))) == set(again.json["progress"])


def test_every_doc_quotes_edgetams_figures_from_the_current_segmenter_table():
    """docs/benchmarks.md's first table under "Segmenters side by side" holds the current figures: the README's
    first-click times and every "EdgeTAM ... X× and Y×" pair in the docs are read from it."""
    text = section("docs/benchmarks.md", "## Segmenters side by side")
    first_table = text[text.index("| model |") :].split("\n\n", 1)[0]
    rows = {cells[0]: cells[1:] for cells in (line.strip("|").split("|") for line in first_table.splitlines()[2:])}
    cold_s, cold_ratio, _, warm_ratio = (float(cell) for cell in rows[" edgetam "][:4])
    vit_b_cold_s = float(rows[" vit_b "][0])
    readme = README.read_text()
    assert f"its first click on an image took {cold_s:.1f} s against ViT-B's\n{vit_b_cold_s:.0f} s" in readme
    for name in ("README.md", "docs/models.md", "docs/benchmarks.md"):
        text = " ".join((REPO / name).read_text().split())
        for pair in re.findall(r"EdgeTAM[^.]*?\(?(\d\.\d\d)×? and (\d\.\d\d)×?", text):
            assert pair == (f"{cold_ratio:.2f}", f"{warm_ratio:.2f}"), (name, pair)
