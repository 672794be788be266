"""The search page in a real headless browser (Debian's Chromium): a typed query shows result images."""

from __future__ import annotations

import shutil

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from background_server import BackgroundServer
from search.server import create_app
from search.sharded import ShardedIndex

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture
def browser(tmp_path):
    assert CHROMIUM and CHROMEDRIVER, "make setup installs Debian's chromium and chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--lang=en-US", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
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


def test_cards_show_the_price_first_and_a_placeholder_where_an_image_does_not_load(
        colour_index, image_server, query_embedder, browser, tmp_path):
    """Each card shows its price (the shopper's first fact, never cut by other attributes) and a
    placeholder, never a broken image, where its image host answers 404: as after `make demo`, whose
    image server is gone once the demo ends."""
    index_dir, _, records = colour_index
    price_of = {r.title: r.attributes["price"] for r in records}
    gone = records[5].title
    del image_server.routes["/5.jpg"]  # the image host of product 5 now answers 404
    with BackgroundServer(create_app(ShardedIndex.open(index_dir), query_embedder)) as server:
        browser.set_window_size(1400, 3000)  # every card in view: images load lazily
        browser.get(server.url + "/?q=shirt")
        wait = WebDriverWait(browser, 30)
        wait.until(lambda driver: len(driver.find_elements(By.CSS_SELECTOR, ".result")) == 24)
        wait.until(lambda driver: driver.execute_script(
            "return [...document.querySelectorAll('.result img')].every(img => img.complete)"))
        wait.until(lambda driver: driver.find_elements(By.CSS_SELECTOR, ".result .placeholder"))
        cards = {card.find_element(By.CSS_SELECTOR, ".title").text: card
                 for card in browser.find_elements(By.CSS_SELECTOR, ".result")}
        assert {title: card.find_element(By.CSS_SELECTOR, ".price").text for title, card in cards.items()} == {
            title: f"{price:.2f}" for title, price in price_of.items()}
        assert cards[gone].find_elements(By.TAG_NAME, "img") == []
        assert cards[gone].find_element(By.CSS_SELECTOR, ".placeholder").text == gone
        assert len(browser.find_elements(By.CSS_SELECTOR, ".result .placeholder")) == 1
        # No broken image anywhere: every image left on the page loaded.
        assert browser.execute_script("const imgs = [...document.querySelectorAll('.result img')];"
                                      "return imgs.length === 23 && imgs.every(img => img.naturalWidth > 0);")
        assert cards[records[0].title].find_element(By.CSS_SELECTOR, ".stock").text == "out of stock"
        assert cards[records[1].title].find_element(By.CSS_SELECTOR, ".stock").text == "in stock"
        browser.save_screenshot(str(tmp_path / "served.png"))

        # The brand and a priced currency come first too, and a product without an image gets the placeholder.
        browser.execute_script("show(arguments[0], '', 0, false)", [
            {"product_id": "x1", "title": "Tote", "shop_id": "s", "image_url": "",
             "attributes": {"price": 1234.5, "currency": "EUR", "brand": "Kestrel", "a": 1, "b": 2, "c": 3, "d": 4,
                            "e": 5}},
            {"product_id": "x2", "title": "Scarf", "shop_id": "s", "image_url": "", "attributes": {"price": "12"}},
            {"product_id": "x3", "title": "Hat", "shop_id": "s", "image_url": "",
             "attributes": {"brand": "Lumen", "price": "on request", "in_stock": "soon"}}])
        tote, scarf, hat = browser.find_elements(By.CSS_SELECTOR, ".result")
        assert tote.find_element(By.CSS_SELECTOR, ".price").text == "€1,234.50"
        assert tote.find_element(By.CSS_SELECTOR, ".brand").text == "Kestrel"
        assert tote.find_element(By.CSS_SELECTOR, ".meta").text == "s · a: 1 · b: 2 · c: 3 · d: 4"
        assert scarf.find_element(By.CSS_SELECTOR, ".facts").text == "12.00"  # no brand, no stock: nothing made up
        assert [part.text for part in hat.find_elements(By.CSS_SELECTOR, ".facts span")] == ["on request", "Lumen"]
        assert hat.find_element(By.CSS_SELECTOR, ".meta").text == "s · in_stock: soon"
        assert len(browser.find_elements(By.CSS_SELECTOR, ".result .placeholder")) == 3
        browser.save_screenshot(str(tmp_path / "cards.png"))


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
