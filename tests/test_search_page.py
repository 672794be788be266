"""The search page in a real headless browser (Debian's Chromium): a typed query shows result images."""

from __future__ import annotations

import shutil

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from localstack.http_server import BackgroundServer
from search.server import create_app
from search.sharded import ShardedIndex

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture
def browser(tmp_path):
    assert CHROMIUM and CHROMEDRIVER, "make setup installs Debian's chromium and chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_a_typed_query_shows_result_images(colour_index, query_embedder, browser, tmp_path):
    index_dir, _, _ = colour_index
    with BackgroundServer(create_app(ShardedIndex.open(index_dir), query_embedder)) as server:
        browser.set_window_size(1400, 3000)  # every card in view: images load lazily, as they come into view
        browser.get(server.url + "/")
        box = browser.find_element(By.ID, "q")
        box.send_keys("green shirt")
        browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        wait = WebDriverWait(browser, 30)
        wait.until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, ".result img")))
        # Every result image has actually loaded from the image host.
        wait.until(lambda driver: driver.execute_script(
            "const imgs = [...document.querySelectorAll('.result img')];"
            "return imgs.length > 0 && imgs.every(img => img.complete && img.naturalWidth > 0);"))
        cards = browser.find_elements(By.CSS_SELECTOR, ".result")
        assert len(cards) == 24
        assert "shirt" in cards[0].find_element(By.CSS_SELECTOR, ".title").text
        assert "results 1–24 in" in browser.find_element(By.ID, "status").text
        browser.save_screenshot(str(tmp_path / "page.png"))


def test_filters_facets_url_state_similar_items_and_a_narrow_screen(colour_index, query_embedder, browser, tmp_path):
    """Facet checkboxes filter and count, the query and filters live in the URL (the back button
    undoes a filter), each card links to its similar items, an empty result says why, and the page
    fits a 390 px wide phone without sideways scrolling."""
    index_dir, _, records = colour_index
    colour_of = {r.product_id: r.attributes["colour"] for r in records}
    wait = WebDriverWait(browser, 30)

    def cards():
        return browser.find_elements(By.CSS_SELECTOR, ".result")

    def settled():  # the page has answered what its URL asks
        wait.until(lambda driver: driver.find_element(By.ID, "status").text not in ("", "Searching…")
                   or driver.find_element(By.ID, "empty").is_displayed())

    with BackgroundServer(create_app(ShardedIndex.open(index_dir), query_embedder)) as server:
        browser.set_window_size(390, 844)
        browser.get(server.url + "/?q=shirt")
        wait.until(lambda driver: len(cards()) == 24)
        red = browser.find_element(By.CSS_SELECTOR, "input[name='f.colour'][value='red']")
        count = red.find_element(By.XPATH, "..").find_element(By.CSS_SELECTOR, ".count").text
        assert count == "8"
        red.click()
        wait.until(lambda driver: "f.colour=red" in driver.current_url and len(cards()) == 8)
        assert all("colour: red" in card.find_element(By.CSS_SELECTOR, ".meta").text for card in cards())
        # The colour facet still offers the other colours ("or"), counted without the colour choice.
        wait.until(lambda driver: len(driver.find_elements(By.CSS_SELECTOR, "input[name='f.colour']")) == 3)
        green = browser.find_element(By.CSS_SELECTOR, "input[name='f.colour'][value='green']")
        assert green.find_element(By.XPATH, "..").find_element(By.CSS_SELECTOR, ".count").text == "8"
        assert browser.execute_script("return document.documentElement.scrollWidth") <= 390
        browser.save_screenshot(str(tmp_path / "narrow.png"))

        browser.back()
        wait.until(lambda driver: "f.colour" not in driver.current_url and len(cards()) == 24)
        browser.forward()
        wait.until(lambda driver: len(cards()) == 8)

        first = cards()[0].find_element(By.CSS_SELECTOR, ".title").text
        product = next(r.product_id for r in records if r.title == first)
        cards()[0].find_element(By.CSS_SELECTOR, "a.similar").click()
        wait.until(lambda driver: f"similar={product}" in driver.current_url)
        settled()
        shown = [card.find_element(By.CSS_SELECTOR, ".title").text for card in cards()]
        assert first not in shown and "Similar to" in browser.find_element(By.ID, "status").text

        browser.get(server.url + "/?q=shirt&f.colour=purple&shop=shop-1")
        wait.until(lambda driver: driver.find_element(By.ID, "empty").is_displayed())
        empty = browser.find_element(By.ID, "empty").text
        assert "colour is purple" in empty and "shop shop-1" in empty and "Remove a filter" in empty
        assert cards() == [] and colour_of


def test_the_api_docs_render_in_a_browser_from_the_service_alone(colour_index, query_embedder, browser):
    """/docs (Swagger UI) and /redoc draw the API from scripts the service serves itself: no CDN, so
    they render on a machine without a network (this one has none)."""
    index_dir, _, _ = colour_index
    with BackgroundServer(create_app(ShardedIndex.open(index_dir), query_embedder)) as server:
        wait = WebDriverWait(browser, 30)
        browser.get(server.url + "/docs")
        wait.until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, ".opblock")))
        operations = {element.text for element in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
        assert {"/v1/search", "/healthz"} <= operations
        scripts = "return performance.getEntriesByType('resource').map(r => r.name).filter(n => /[.](js|css)$/.test(n))"
        assert all(name.startswith(server.url) for name in browser.execute_script(scripts))
        browser.get(server.url + "/redoc")
        wait.until(lambda driver: "/v1/search" in driver.find_element(By.TAG_NAME, "body").text)
        loaded = browser.execute_script(scripts)
        assert loaded and all(name.startswith(server.url) for name in loaded), loaded  # (ReDoc's logo is not)
