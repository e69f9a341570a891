"""The browser stage's setting: headless Chromium (Debian's package) driven by Playwright, logged into the e2e
stage's real Label Studio, and this backend under gunicorn with Redis, connected to each project as a user would.

A failing test gets the page's screenshot and its browser console log attached to its report. With
`--readme-screenshots DIR` (`make screenshots`), the screenshots the README shows are also written to DIR, small."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from PIL import Image
from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright

from tests.browser.labeling import ConsoleLog, LabelingPage
from tests.e2e.conftest import backend_environment, label_studio, personal_access_token  # noqa: F401 (fixtures)
from tests.e2e.label_studio import LabelStudioProcess
from tests.load_harness import GunicornServer

VIEWPORT = {"width": 1280, "height": 960}  # the whole README config, text prompt included, without scrolling
README_WIDTH = 960  # pixels; PNGs of the README, in a 64-colour palette
README_COLOURS = 64


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--readme-screenshots", metavar="DIR", help="also write the README's screenshots, downscaled, to DIR"
    )


def chromium_executable() -> str:
    """The system Chromium: Playwright's own browser downloads are not available to the suite."""
    executable = shutil.which("chromium")
    if executable is None:
        raise RuntimeError("chromium is not installed: apt-get install chromium")
    return executable


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium_executable())
        yield launched
        launched.close()


@pytest.fixture(scope="session")
def backend(
    label_studio: LabelStudioProcess,  # noqa: F811 (the imported fixture)
    personal_access_token: str,  # noqa: F811
    sam_checkpoint: Path,
    grounding_dino_files,
    redis_server,
    tmp_path_factory,
) -> Iterator[GunicornServer]:
    """One gunicorn worker: the stage runs one browser at a time on a 2-core machine."""
    environment = backend_environment(
        label_studio.url,
        personal_access_token,
        sam_checkpoint,
        grounding_dino_files,
        redis_server.url,
        tmp_path_factory.mktemp("browser-models"),
    ) | {"MAX_OBJECTS": "3"}  # GroundingDINO's random weights find boxes everywhere: keep the page light
    server = GunicornServer(environment, tmp_path_factory.mktemp("browser-backend") / "gunicorn.log", workers=1)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def signed_in(browser: Browser, label_studio: LabelStudioProcess) -> dict:  # noqa: F811
    """The session cookies of Label Studio's user, from its own login form, shared by every test's context."""
    context = browser.new_context()
    page = context.new_page()
    page.goto(f"{label_studio.url}/user/login/")
    page.fill("input[name=email]", label_studio.username)
    page.fill("input[name=password]", label_studio.password)
    with page.expect_navigation():
        page.click("button[type=submit]")
    state = context.storage_state()
    context.close()
    return state


@pytest.fixture
def page(browser: Browser, signed_in: dict, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Page]:
    """A fresh browser context (so a fresh editor state) signed into Label Studio; on a failure, the hook below
    saves its screenshot in `tmp_path`."""
    context: BrowserContext = browser.new_context(storage_state=signed_in, viewport=VIEWPORT)
    opened = context.new_page()
    request.node.browser_page = opened
    request.node.console_log = ConsoleLog(opened)
    yield opened
    context.close()


@pytest.fixture
def console_log(page: Page, request: pytest.FixtureRequest) -> ConsoleLog:
    return request.node.console_log


@pytest.fixture
def readme_screenshot(request: pytest.FixtureRequest) -> Callable[[LabelingPage, str], Path]:
    """Takes the page's screenshot into the test's folder and, with --readme-screenshots, a small copy for docs/."""
    target = request.config.getoption("--readme-screenshots", default=None)

    def take(labeling: LabelingPage, name: str) -> Path:
        path = labeling.screenshot(name)
        if target:
            with Image.open(path) as full:
                small = full.convert("RGB").resize(
                    (README_WIDTH, round(full.height * README_WIDTH / full.width)), Image.Resampling.LANCZOS
                )
            small.quantize(README_COLOURS, method=Image.Quantize.FASTOCTREE).save(
                Path(target) / f"{name}.png", optimize=True
            )
        return path

    return take


FIGURES = pytest.StashKey[list[str]]()


@pytest.fixture
def stage_figures(request: pytest.FixtureRequest) -> list[str]:
    """Figures the tests measured, printed at the end of the run."""
    return request.config.stash.setdefault(FIGURES, [])


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    figures = terminalreporter.config.stash.get(FIGURES, [])
    if figures:
        terminalreporter.write_sep("-", "browser stage figures")
        for line in figures:
            terminalreporter.write_line(line)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """On a failure, the page as it was and everything the browser logged, attached to the failing report."""
    report = yield
    opened: Page | None = getattr(item, "browser_page", None)
    if report.failed and report.when == "call" and opened is not None and not opened.is_closed():
        screenshot = Path(item.funcargs["tmp_path"]) / "failure.png"
        opened.screenshot(path=screenshot)
        report.sections.append(("browser screenshot", str(screenshot)))
        report.sections.append(("browser console log", item.console_log.text()))
    return report
