"""pipelines/serve.py's application on an embedded Ray (loopback only): the routes, and a
bounded load test during a publish with zero failed requests."""
import json
import socket
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.serving.serving_data import jpeg, make_gallery

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url, data=None, headers=None, timeout=60):
    req = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read(), r.headers.get("content-type", "")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get("content-type", "")


def multipart(name, filename, data):
    boundary = "----crtest"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import os

    import ray
    from ray import serve

    from serving.app import start

    g = make_gallery(str(tmp_path_factory.mktemp("serve")))
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    try:
        start(g.index, "127.0.0.1", port, gallery_images=g.root, replicas=2, check_every=0.2, num_cpus=0.5)
        yield g, f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_routes(served):
    g, base = served
    status, body, _ = request(f"{base}/healthz")
    assert status == 200 and json.loads(body)["index"] == "g"
    photo = Path(g.root, "item3/2.jpg").read_bytes()
    status, body, _ = request(f"{base}/search?k=3", photo)
    res = json.loads(body)
    assert status == 200 and res["results"][0]["image_id"] == "item3/2.jpg" and len(res["results"]) == 3
    status, body, _ = request(f"{base}/search?k=2&rerank=aqe", *multipart("image", "q.jpg", photo))
    assert status == 200 and len(json.loads(body)["results"]) == 2
    status, body, _ = request(f"{base}/search", b"not an image")
    assert status == 400 and "undecodable image" in json.loads(body)["detail"]
    status, body, _ = request(f"{base}/search?k=abc", photo)
    assert status in (400, 422)
    status, body, ctype = request(f"{base}/images/item3/2.jpg")
    assert status == 200 and ctype == "image/jpeg" and body[:2] == b"\xff\xd8"
    for bad in ("..%2Fmodel%2Fconfig.json", "%2Fetc%2Fpasswd", "item3/..%2F..%2Fmodel%2Fmodel.pt"):
        status, body, _ = request(f"{base}/images/{bad}")
        assert status in (400, 404) and b"\x00" not in body[:100]
    status, body, ctype = request(f"{base}/")
    assert status == 200 and b"Drop an image" in body and "text/html" in ctype


def test_load_during_publish_fails_no_request(served):
    """8 clients x 50 requests while a new version is built and published: every answer 200,
    and answers from the new version arrive before the end."""
    from index.ann.build import BuildConfig, build_index

    g, base = served
    photo = jpeg(11)
    statuses, versions = [], set()
    lock = threading.Lock()

    def client():
        for _ in range(50):
            status, body, _ = request(f"{base}/search?k=5", photo)
            with lock:
                statuses.append(status)
                if status == 200:
                    versions.add(json.loads(body)["version"])

    first = json.loads(request(f"{base}/healthz")[1])["version"]
    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    new = build_index(g.embeddings, g.index_root, g.name, BuildConfig(index_type="flat", eval_queries=4),
                      progress=lambda m: None, model_dir=g.model_dir).version
    for t in threads:
        t.join(timeout=300)
    assert len(statuses) == 400 and set(statuses) == {200}
    assert first in versions or new in versions
    import time

    deadline = time.time() + 30
    while time.time() < deadline and json.loads(request(f"{base}/healthz")[1])["version"] != new:
        time.sleep(0.2)
    assert json.loads(request(f"{base}/healthz")[1])["version"] == new


def chromium_paths():
    import shutil

    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    driver = shutil.which("chromedriver")
    return browser, driver


def test_page_in_headless_chromium(served, tmp_path):
    """The page in a real browser: pick a file, see ranked thumbnails with item ids and scores."""
    browser, driver_path = chromium_paths()
    if not browser or not driver_path:
        pytest.skip("chromium / chromedriver not found (apt-get install chromium chromium-driver)")
    pytest.importorskip("selenium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    g, base = served
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(flag)
    drv = webdriver.Chrome(service=Service(driver_path), options=opts)
    try:
        drv.set_page_load_timeout(60)
        drv.get(f"{base}/")
        photo = Path(g.root, "item2/0.jpg")
        drv.find_element(By.ID, "file").send_keys(str(photo))
        wait = WebDriverWait(drv, 60)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".result img")) >= 5)
        # every thumbnail loaded and drawn (naturalWidth > 0 only for a decoded image)
        wait.until(lambda d: d.execute_script(
            "return [...document.querySelectorAll('.result img')].every(i => i.complete && i.naturalWidth > 0)"))
        first = drv.find_elements(By.CSS_SELECTOR, ".result")[0]
        assert first.get_attribute("data-item") == "3" and "item 3" in first.text
        assert first.find_element(By.TAG_NAME, "img").get_attribute("alt") == "item2/0.jpg"
        assert "version" in drv.find_element(By.ID, "status").text
    finally:
        drv.quit()
