"""Label Studio's labelling page as the browser tests drive it: a project set up through the API as a user would,
the page's console, and the page's own controls and state, waited on rather than slept on.

The selectors are Label Studio 1.23.2's own (its editor's BEM classes, `data-testid`s and `aria-label`s): the
"Auto-Annotation" switch, the smart tools behind the toolbar's "Auto-Detect" button, the label chips of each
control, the suggestions bar (accept / reject) and the outliner's region list, whose rows carry the region type."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from playwright.sync_api import ConsoleMessage, Error, Page, Response, expect

from tests.assets import REPO, encode, smooth_object_image
from tests.e2e.label_studio import LabelStudioApi

LABEL_CONFIG = (REPO / "label_config.xml").read_text()
# The README config's label controls, in the order the page shows their label chips.
BRUSH, KEYPOINTS, RECTANGLES = 0, 1, 2
# How long the page may take for what the backend computes on a busy 2-core machine (a wait, not a sleep).
BACKEND_WAIT_MS = 180_000
INTERACTIVE = "**/api/ml/*/interactive-annotating"
REGION_ROWS = ".lsf-outliner-tree [role=treeitem]"


class ConsoleLog:
    """Everything the page logs to its console, and its uncaught errors, in order."""

    def __init__(self, page: Page) -> None:
        self.lines: list[str] = []
        self.errors: list[str] = []
        page.on("console", self.console)
        page.on("pageerror", self.page_error)

    def console(self, message: ConsoleMessage) -> None:
        self.lines.append(f"{message.type}: {message.text}")

    def page_error(self, error: Error) -> None:
        self.errors.append(f"{error.name}: {error.message}")
        self.lines.append(f"pageerror: {error.name}: {error.message}\n{error.stack}")

    def text(self) -> str:
        return "\n".join(self.lines) or "(nothing logged)"


@dataclass
class Project:
    """A project of one image task, connected to the backend with interactive pre-annotations on."""

    api: LabelStudioApi
    id: int
    task: int
    width: int
    height: int

    def annotations(self) -> list[dict]:
        return self.api.call("GET", f"/api/tasks/{self.task}/annotations/")

    def predictions(self) -> list[dict]:
        return self.api.call("GET", "/api/predictions", params={"task": self.task})


def create_project(
    api: LabelStudioApi,
    backend_url: str,
    title: str,
    *,
    width: int = 640,
    height: int = 480,
    label_config: str = LABEL_CONFIG,
    show_predictions: bool = False,
) -> Project:
    """`show_predictions` is Label Studio's "show predictions to annotator" (its default is on): on, opening a task
    without a prediction asks the backend for one; off, the page holds only what the annotator does."""
    project = api.call(
        "POST",
        "/api/projects",
        json={"title": title, "label_config": label_config, "show_collab_predictions": show_predictions},
    )["id"]
    image = encode(smooth_object_image(width, height, 1))
    api.call("POST", f"/api/projects/{project}/import", files={"car.jpg": ("car.jpg", image, "image/jpeg")})
    connected = api.call(
        "POST", "/api/ml", json={"url": backend_url, "project": project, "title": "SAM", "is_interactive": True}
    )
    assert connected["state"] == "CO", connected
    (task,) = api.call("GET", "/api/tasks", params={"project": project})["tasks"]
    return Project(api, project, task["id"], width, height)


class LabelingPage:
    """One task open in Label Studio's labelling page, driven as an annotator does."""

    def __init__(self, page: Page, label_studio_url: str, project: Project, output: Path) -> None:
        self.page = page
        self.project = project
        self.url = f"{label_studio_url}/projects/{project.id}/data?task={project.task}"
        self.output = output

    def open(self, wait_ms: float = 60_000) -> None:
        self.page.goto(self.url)
        self.page.locator(".konvajs-content").wait_for(timeout=wait_ms)

    def turn_on_auto_annotation(self) -> None:
        self.page.get_by_test_id("bottombar-auto-annotation-toggle").check()

    def choose_smart_tool(self, tool: str) -> None:
        """`tool` is the tool's aria-label, e.g. "key-point-tool": the smart variants are listed when the pointer
        rests on the toolbar's Auto-Detect button."""
        self.page.locator(".lsf-tool_smart").first.hover()
        self.page.locator(f".lsf-toolbar__smart button[aria-label={tool}]").click()

    def choose_the_one_smart_tool(self) -> None:
        """With a single smart tool in the config, the Auto-Detect button is that tool and lists nothing."""
        self.page.locator(".lsf-tool_smart").first.click()

    def choose_label(self, control: int, label: str) -> None:
        """Label Studio unselects the label once a region is drawn with it, so each click or box starts here."""
        chip = self.page.locator(".lsf-labels").nth(control).locator(".lsf-label", has_text=label)
        chip.click()
        expect(chip).to_have_class(re.compile(r"\blsf-label_selected\b"))

    def point(self, x: float, y: float) -> tuple[float, float]:
        """Screen coordinates of the point at fractions `x`, `y` of the image's width and height."""
        stage = self.page.locator(".konvajs-content").bounding_box()
        assert stage is not None
        return stage["x"] + x * stage["width"], stage["y"] + y * stage["height"]

    def click_image(self, x: float, y: float, *, negative: bool = False) -> Exchange:
        """A click (Alt+click: a negative one) with a smart keypoint tool."""
        with self.page.expect_response(INTERACTIVE, timeout=BACKEND_WAIT_MS) as answer:
            if negative:
                self.page.keyboard.down("Alt")
            self.page.mouse.click(*self.point(x, y))
            if negative:
                self.page.keyboard.up("Alt")
        return interactive_exchange(answer.value)

    def drag_on_image(self, start: tuple[float, float], end: tuple[float, float]) -> Exchange:
        """A box drawn with a smart rectangle tool."""
        with self.page.expect_response(INTERACTIVE, timeout=BACKEND_WAIT_MS) as answer:
            self.page.mouse.move(*self.point(*start))
            self.page.mouse.down()
            self.page.mouse.move(*self.point(*end), steps=10)
            self.page.mouse.up()
        return interactive_exchange(answer.value)

    def submit_text_prompt(self, text: str) -> Exchange:
        self.page.get_by_test_id("textarea-input").fill(text)
        with self.page.expect_response(INTERACTIVE, timeout=BACKEND_WAIT_MS) as answer:
            self.page.get_by_test_id("textarea-add-button").click()
        return interactive_exchange(answer.value)

    def wait_for_suggestions(self, ids: list[str]) -> None:
        """Until the suggestions Label Studio shows are exactly the regions `ids` the backend answered."""
        self.page.wait_for_function(
            """ids => {
                const shown = Array.from(window.dataManager.lsf.currentAnnotation.suggestions.values());
                const clean = shown.map(region => region.cleanId).sort();
                return JSON.stringify(clean) === JSON.stringify([...ids].sort());
            }""",
            arg=ids,
        )
        expect(self.page.locator(".lsf-auto-accept__info")).to_have_text(f"{len(ids)} suggestions")

    def accept_suggestions(self) -> None:
        self.page.get_by_test_id("bottombar-accept-suggestions-button").click()

    def wait_for_regions(self, wait_ms: float) -> None:
        """Until the region list shows a region."""
        self.page.locator(REGION_ROWS).first.wait_for(timeout=wait_ms)

    def region_rows(self, expected: int, wait_ms: float = 30_000) -> list[tuple[str, str]]:
        """(region type, label) of each row of the region list, once it shows `expected` rows."""
        expect(self.page.locator(REGION_ROWS)).to_have_count(expected, timeout=wait_ms)
        return self.shown_region_rows()

    def shown_region_rows(self) -> list[tuple[str, str]]:
        """(region type, label) of the rows the region list shows now: a long list renders only those in view."""
        rows = self.page.locator(REGION_ROWS)
        return [
            (
                re.search(r"lsf-tree__node_type_(\w+)", row.get_attribute("class") or "")[1],
                row.locator(".lsf-labels-list").first.inner_text(),
            )
            for row in rows.all()
        ]

    def submit(self) -> None:
        with self.page.expect_response(
            lambda response: response.request.method == "POST" and "/annotations" in response.url
        ) as stored:
            self.page.get_by_test_id("bottombar-submit-button").click()
        assert stored.value.status == 201, stored.value.text()

    def screenshot(self, name: str) -> Path:
        path = self.output / f"{name}.png"
        self.page.screenshot(path=path)
        return path


@dataclass
class Exchange:
    """One smart-tool round trip: the regions Label Studio sent as context, and the regions the backend answered."""

    sent: list[dict]
    answered: list[dict]


def interactive_exchange(response: Response) -> Exchange:
    assert response.ok, f"{response.status} {response.text()[:500]}"
    answer = response.json()  # Label Studio wraps the backend's answer: {"data": {"result": [...]}}
    assert "errors" not in answer, answer
    return Exchange(response.request.post_data_json["context"]["result"], answer["data"]["result"])
