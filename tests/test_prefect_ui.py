"""End to end in the Prefect UI: headless Chromium (Debian's, driven by Playwright) on the test server.

Opens the flow-run pages of the session's batch run (see ``test_batch_flow.py``), finds the artifacts'
content, and saves screenshots under the test's tmp dir and in ``.tmp/`` of the repository:
``prefect-ui.png`` (class-area table), ``prefect-ui-summary.png`` (outputs), ``prefect-ui-batch.png``
(the batch report naming the broken scene and its error).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from conftest import ROOT
from prefect.client.orchestration import get_client
from test_batch_flow import first_batch, shared_server, subflow_runs, use_server
from test_train import _config as train_config

#: Flags for Chromium in a container: no sandbox (root), no GPU, nothing that calls home.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-quic",
]
CLASSES = ["developed", "agriculture", "herbaceous", "shrubland", "forest", "water", "sediment"]
TIMEOUT_MS = 60_000


def find_chromium() -> str | None:
    """``$GEOSEG_CHROMIUM``, Debian's ``/usr/bin/chromium``, or a chromium on PATH."""
    for candidate in (os.environ.get("GEOSEG_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture(scope="module")
def browser():
    path = find_chromium()
    if path is None:
        pytest.skip("no Chromium: /usr/bin/chromium is missing (run scripts/install_chromium.sh as root, "
                    "or set GEOSEG_CHROMIUM=/path/to/chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    sync_api.expect.set_options(timeout=TIMEOUT_MS)  # a loaded 2-core CI machine renders slowly
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def ui(request, tmp_path_factory, tiny_checkpoint):
    """The server (with its UI) and the session's batch run on it."""
    with use_server(shared_server(request.config, tmp_path_factory)) as server:
        yield server, first_batch(request.config, tmp_path_factory, tiny_checkpoint)


@pytest.fixture
def page(browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(TIMEOUT_MS)
    yield page
    page.close()


def subflows(run) -> dict[str, object]:
    with get_client(sync_client=True) as client:
        return {r.name.rsplit("-", 1)[0]: r for r in subflow_runs(client, run.flow_run_id)}


def save(page, tmp_path: Path, name: str) -> Path:
    """Screenshot into the test's tmp dir, copied to <repo>/.tmp/<name> for people to look at."""
    shot = tmp_path / name
    page.screenshot(path=str(shot), full_page=True)
    (ROOT / ".tmp").mkdir(exist_ok=True)
    shutil.copy(shot, ROOT / ".tmp" / name)
    return shot


def open_artifact(page, ui_url: str, flow_run_id, key: str) -> None:
    """Open the flow-run page, its Artifacts tab, then the artifact ``key``."""
    from playwright.sync_api import expect

    page.goto(f"{ui_url}/runs/flow-run/{flow_run_id}", wait_until="domcontentloaded")
    page.get_by_text("Artifacts", exact=True).first.click()
    card = page.get_by_text(key, exact=True).first
    expect(card).to_be_visible()
    card.click()
    expect(page).to_have_url(re.compile(r"/artifacts/artifact/"))


@pytest.mark.slow
def test_predict_run_page_shows_class_areas_and_outputs(ui, page, tmp_path):
    from playwright.sync_api import expect

    server, run = ui
    full = subflows(run)["nc_full"]
    page.goto(f"{server.ui_url}/runs/flow-run/{full.id}", wait_until="domcontentloaded")
    expect(page.get_by_text(full.name, exact=True).first).to_be_visible()
    page.get_by_text("Artifacts", exact=True).first.click()
    for key in ("predict-summary", "class-areas"):
        expect(page.get_by_text(key, exact=True).first).to_be_visible()
    expect(page.get_by_text(re.compile(r"^blocks-[0-9a-f]{16}$")).first).to_be_visible()  # the progress artifact
    save(page, tmp_path, "prefect-ui-artifacts.png")

    page.get_by_text("class-areas", exact=True).first.click()
    expect(page.get_by_text("Class areas of nc_full.tif")).to_be_visible()
    for header in ("class", "area_km2", "percent"):
        expect(page.get_by_role("columnheader", name=header, exact=True)).to_be_visible()
    table = page.get_by_role("table")
    expect(table.get_by_role("row")).to_have_count(1 + len(CLASSES))
    for name in CLASSES:  # text cells are rendered as markdown
        expect(table.get_by_text(name, exact=True)).to_be_visible()
    shot = save(page, tmp_path, "prefect-ui.png")
    assert shot.stat().st_size > 10_000

    open_artifact(page, server.ui_url, full.id, "predict-summary")
    out_dir = full.parameters["out_dir"]
    expect(page.get_by_role("heading", name="geoseg predict: nc_full.tif")).to_be_visible()
    expect(page.get_by_text(f"{out_dir}/nc_full_classes.tif", exact=True)).to_be_visible()
    expect(page.get_by_text(f"{out_dir}/summary.json", exact=True)).to_be_visible()
    save(page, tmp_path, "prefect-ui-summary.png")


@pytest.mark.slow
def test_batch_run_page_shows_the_failure_report(ui, page, tmp_path):
    from playwright.sync_api import expect

    server, run = ui
    page.goto(f"{server.ui_url}/runs/flow-run/{run.flow_run_id}", wait_until="domcontentloaded")
    expect(page.get_by_text("Failed", exact=True).first).to_be_visible()

    open_artifact(page, server.ui_url, run.flow_run_id, "batch-report")
    expect(page.get_by_role("heading", name="geoseg batch: 2 processed, 0 skipped, 1 failed")).to_be_visible()
    expect(page.get_by_role("heading", name="Failures")).to_be_visible()
    failure = page.locator("li", has_text="broken.tif")
    expect(failure).to_contain_text("not a raster GDAL can read")
    expect(failure.get_by_role("link", name="predict run")).to_be_visible()
    expect(page.get_by_text(re.compile(r"^1 of 3 scenes failed: broken\.tif"))).to_be_visible()  # state message
    save(page, tmp_path, "prefect-ui-batch.png")

    broken = subflows(run)["broken"]
    href = failure.get_by_role("link", name="predict run").get_attribute("href")
    assert href == f"{server.ui_url}/runs/flow-run/{broken.id}"
    page.goto(href, wait_until="domcontentloaded")  # the failed predict subflow: its clear error
    expect(page.get_by_text(broken.name, exact=True).first).to_be_visible()
    expect(page.get_by_text("Failed", exact=True).first).to_be_visible()
    expect(page.get_by_text(re.compile(r"InvalidSceneError\(.*broken\.tif: not a raster GDAL can read")).first) \
        .to_be_visible()


def rendered_images(page, alt: str, count: int) -> list[tuple[int, int]]:
    """Wait until ``count`` images whose alt text starts with ``alt`` have loaded; their natural sizes.

    A broken image (an unloadable or stripped ``src``) never completes with a width, so this fails.
    """
    from playwright.sync_api import expect

    images = page.locator(f'img[alt^="{alt}"]')
    expect(images).to_have_count(count)
    page.wait_for_function(
        "([alt, n]) => { const im = [...document.querySelectorAll('img')].filter(e => e.alt.startsWith(alt));"
        " return im.length === n && im.every(e => e.complete && e.naturalWidth > 0); }",
        arg=[alt, count], timeout=TIMEOUT_MS,
    )
    return images.evaluate_all("els => els.map(e => [e.naturalWidth, e.naturalHeight])")


def png_size(path: Path) -> tuple[int, int]:
    head = Path(path).read_bytes()[:24]
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


@pytest.mark.slow
def test_predict_and_batch_run_pages_show_the_quicklook(ui, page, tmp_path):
    server, run = ui
    full = subflows(run)["nc_full"]
    open_artifact(page, server.ui_url, full.id, "quicklook")
    [size] = rendered_images(page, "quick-look of nc_full.tif", 1)
    assert tuple(size) == png_size(Path(full.parameters["out_dir"]) / "nc_full_quicklook.png")
    save(page, tmp_path, "prefect-ui-quicklook.png")

    open_artifact(page, server.ui_url, run.flow_run_id, "batch-quicklooks")
    sizes = rendered_images(page, "quick-look of", 2)  # the two scenes processed; the broken one has none
    assert all(w > 400 and h > 200 for w, h in sizes)
    save(page, tmp_path, "prefect-ui-batch-quicklooks.png")


@pytest.mark.slow
def test_train_run_page_shows_curves_and_confusion(ui, page, tiny_data, tmp_path):
    import yaml

    from flows.train import train as train_flow

    server, _ = ui
    cfg = tmp_path / "train" / "tiny.yaml"
    cfg.parent.mkdir()
    settings = train_config(tiny_data, epochs=2, out_dir=str(tmp_path / "run"))
    cfg.write_text(yaml.safe_dump(settings.model_dump(mode="json")))
    state = train_flow(str(cfg), return_state=True)
    assert state.is_completed()
    run_id = state.state_details.flow_run_id
    open_artifact(page, server.ui_url, run_id, "train-curves")
    rendered_images(page, "loss and val mIoU", 1)
    open_artifact(page, server.ui_url, run_id, "train-confusion")
    rendered_images(page, "confusion matrix", 1)
    save(page, tmp_path, "prefect-ui-train-confusion.png")
