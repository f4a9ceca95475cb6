"""The page of `tinycifar serve` in a real headless Chromium (Debian's, driven by Playwright).

One real server process, started the way a user starts it, with two checkpoints. Screenshots go
to the test's folder, and also to $TINYCIFAR_SCREENSHOTS when it is set (the README's picture).
Without Chromium these tests skip with the reason; under CI (CI=true) they fail instead.
"""

from __future__ import annotations

import base64
import os
import shutil
import sys
from pathlib import Path

import pytest
from serve_helpers import png_bytes, running_server, served_checkpoint

from tinycifar.data import CLASSES

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


def _need_browser():
    reason = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        reason = "playwright is not installed (pip install -e '.[dev]')"
    if reason is None and CHROMIUM is None:
        reason = "no chromium on this machine (apt-get install chromium)"
    if reason and os.environ.get("CI") == "true":
        pytest.fail(f"browser tests must run in CI: {reason}")
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    _need_browser()
    root = tmp_path_factory.mktemp("browser")
    a, b = served_checkpoint(root / "fast-a"), served_checkpoint(root / "slim-b", model="slimres50k", seed=1)
    argv = [sys.executable, "-m", "tinycifar", "serve", "--checkpoint", str(a), "--checkpoint", str(b),
            "--threads", "1"]
    with running_server(argv, env={**os.environ, "OMP_NUM_THREADS": "1"}) as (url, _):
        yield url, root


@pytest.fixture(scope="module")
def browser():
    _need_browser()  # pytest may set this fixture up before the server: skip (or fail in CI) here too
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    url, _ = server
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    external = []
    page.on("request", lambda r: None if r.url.startswith((url, "data:")) else external.append(r.url))
    failed = []
    page.on("response", lambda r: failed.append(r.url) if r.status >= 400 else None)
    page.goto(url + "/")
    page.wait_for_selector("body[data-ready='1']", timeout=60_000)
    page.failed = failed  # a test that provokes an error removes what it expects
    yield page
    assert not external, f"the page loaded something from elsewhere: {external}"
    assert not failed, f"requests that failed: {failed}"
    context.close()


def shot(page, name: str, tmp_path: Path) -> None:
    page.screenshot(path=str(tmp_path / name), full_page=True)
    target = os.environ.get("TINYCIFAR_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / name, Path(target) / name)


def test_upload_an_image_and_see_the_class_and_the_overlay(page, tmp_path):
    image = tmp_path / "photo.png"
    image.write_bytes(png_bytes(5, (120, 90)))
    page.set_input_files("#files", str(image))
    page.wait_for_selector(".result .cam", timeout=60_000)
    verdict = page.text_content(".result .verdict").strip()
    assert verdict in CLASSES
    assert page.locator(".result .bar").count() == 5
    assert page.eval_on_selector(".result img.cam", "img => img.complete && img.naturalWidth") == 32
    page.fill("#opacity", "20")
    page.dispatch_event("#opacity", "input")
    assert page.eval_on_selector(".result img.cam", "img => img.style.opacity") == "0.2"
    shot(page, "serve-upload.png", tmp_path)


def _dispatch_file(page, event: str, target: str, data: bytes, name: str) -> None:
    page.evaluate("""([event, target, b64, name]) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], name, { type: "image/png" }));
        const node = target === "document" ? document : document.querySelector(target);
        const init = { bubbles: true, cancelable: true };
        node.dispatchEvent(event === "paste" ? new ClipboardEvent("paste", { ...init, clipboardData: dt })
                                             : new DragEvent("drop", { ...init, dataTransfer: dt }));
    }""", [event, target, base64.b64encode(data).decode(), name])


def test_drop_and_paste_several_images_and_a_bad_one(page):
    _dispatch_file(page, "drop", "#drop", png_bytes(1), "dropped.png")
    page.wait_for_selector(".result h3:text('dropped.png')", timeout=60_000)
    _dispatch_file(page, "paste", "document", png_bytes(2), "pasted.png")
    page.wait_for_selector(".result h3:text('pasted.png')", timeout=60_000)
    page.set_input_files("#files", [{"name": "notes.png", "mimeType": "image/png", "buffer": b"not an image"}])
    page.wait_for_selector(".result.error", timeout=60_000)
    assert "notes.png" in page.text_content(".result.error") and "notes.png" in page.text_content("#status")
    assert [u.split("?")[0].rsplit("/", 1)[1] for u in page.failed] == ["predict"]  # the 400, on purpose
    page.failed.clear()


def test_switch_models_and_open_the_mistakes(page, tmp_path):
    assert page.locator("#model option").count() == 2
    assert "fastnet" in page.text_content("#card-body")
    page.select_option("#model", "slim-b")
    page.wait_for_function("document.querySelector('#card-body').textContent.includes('slimres50k')")
    assert "51,258" in page.text_content("#card-body")
    page.click("#tab-mistakes")
    page.wait_for_selector("#gallery .thumb.miss", timeout=60_000)
    assert "→" in page.text_content("#gallery .thumb span")
    page.click("#gallery .thumb")
    page.wait_for_selector(".result .truth", timeout=60_000)
    assert page.locator(".result .cam").count() == 1
    shot(page, "serve-mistakes.png", tmp_path)


def test_usable_on_a_phone_sized_window(browser, server, tmp_path):
    url, _ = server
    context = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True)
    page = context.new_page()
    page.goto(url + "/")
    page.wait_for_selector("body[data-ready='1']", timeout=60_000)
    page.click("#gallery .thumb")
    page.wait_for_selector(".result .cam", timeout=60_000)
    overflow = page.evaluate("document.scrollingElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow}px wider than the phone"
    shot(page, "serve-phone.png", tmp_path)
    context.close()
