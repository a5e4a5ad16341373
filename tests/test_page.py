"""serve's page (GET /), end to end in a real headless browser: Debian's chromium and its
driver, driven by selenium (browsers that packages download do not run on these machines)."""

from __future__ import annotations

import base64
import io
import shutil

import numpy as np
import pytest

pytest.importorskip("uvicorn")
webdriver = pytest.importorskip("selenium.webdriver", reason="the page test needs selenium: pip install selenium")

from PIL import Image  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from serving import in_process  # noqa: E402

from glyph_engine.serve.batcher import BatchConfig  # noqa: E402

from fake_service import NoMetrics  # noqa: E402

TOKEN = "page-test-token"
CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM = shutil.which("chromium")


@pytest.fixture(scope="module")
def browser():
    if not (CHROMEDRIVER and CHROMIUM):
        pytest.skip("needs Debian's chromium and chromium-driver (make test installs them as root on Debian)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


@pytest.fixture(scope="module", params=["embedded", "diffusers-folder"])
def served(request, glyffuser_folder, t5_folder):
    """The page's server on the embedded model and on a glyffuser folder; yields (URL, load options)."""
    from glyph_engine.serve.service import ModelService, ReplicaConfig
    from glyph_engine.session import ModelSource

    if request.param == "embedded":
        options = {"ckpt": None, "backend": "auto", "precision": "fp32"}
    else:
        options = {"ckpt": glyffuser_folder, "backend": "torch", "precision": "auto", "text_encoder": str(t5_folder)}
    service = ModelService(ReplicaConfig(ModelSource(**options), BatchConfig(), token=TOKEN), NoMetrics())
    with in_process(service, TOKEN) as url:
        yield url, options


def fill(driver, **fields):
    for name, value in fields.items():
        box = driver.find_element(By.NAME, name)
        box.clear()
        box.send_keys(str(value))


def test_the_page_draws_glyphs_and_shows_the_servers_errors(browser, served, tmp_path):
    import glyph_engine

    url, options = served
    pipe = glyph_engine.load(**options)
    ran = f"{pipe.backend} {pipe.precision}"
    browser.get(url + "/")
    assert browser.find_element(By.NAME, "token").is_displayed()  # this server needs one
    WebDriverWait(browser, 30).until(lambda d: ran in d.find_element(By.ID, "about").text)

    fill(browser, prompt="water; river", n=3, steps=3, seed=7, token=TOKEN)
    browser.find_element(By.ID, "draw").click()
    WebDriverWait(browser, 60).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".grid img")) == 3)
    images = browser.find_elements(By.CSS_SELECTOR, ".grid img")
    # Decoded and laid out by the browser, not only present in the page.
    assert all(
        browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i) == 32 for i in images
    )
    assert all(i.is_displayed() and i.size["width"] > 0 for i in images)
    header = browser.find_element(By.CSS_SELECTOR, ".result h2").text
    assert "water; river" in header and f"3 glyphs, seed 7, {ran}" in header and header.endswith(" s")
    # The glyphs are the server's for these settings, and each link saves its PNG.
    expected = pipe("water; river", n=3, steps=3, seed=7).array
    links = browser.find_elements(By.CSS_SELECTOR, ".grid a")
    for link, pixels in zip(links, expected, strict=True):
        assert link.get_attribute("download").endswith(".png")
        png = base64.b64decode(link.get_attribute("href").split(",", 1)[1])
        assert np.abs(np.asarray(Image.open(io.BytesIO(png))).astype(int) - pixels).max() <= 1
    browser.save_screenshot(str(tmp_path / "page.png"))

    # A bad request shows the server's own sentence, and a wrong token is refused likewise.
    fill(browser, steps=5000)
    browser.find_element(By.ID, "draw").click()
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "error").text)
    assert "steps must be at most 1000" in browser.find_element(By.ID, "error").text
    fill(browser, steps=2, token="wrong")
    browser.find_element(By.ID, "draw").click()
    WebDriverWait(browser, 30).until(lambda d: "token" in d.find_element(By.ID, "error").text)
    assert "missing or wrong token" in browser.find_element(By.ID, "error").text
    assert len(browser.find_elements(By.CSS_SELECTOR, ".grid img")) == 3  # nothing drawn by either


def test_the_token_field_shows_only_where_the_server_needs_one(browser):
    from fake_service import FakeService

    for token, shown in ((None, False), (TOKEN, True)):
        with in_process(FakeService(), token) as url:
            browser.get(url + "/")
            assert browser.find_element(By.NAME, "token").is_displayed() is shown
