"""`cxr serve`: API through FastAPI's test client, concurrency, bad inputs, and the page in headless Chromium."""

from __future__ import annotations

import io
import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from fakes import BAD_CORPUS_EXPECT, png_bytes, write_monochrome1_dicom, xray_like

pytest.importorskip("fastapi", reason="cxr serve needs fastapi (pip install -e .)")
from fastapi.testclient import TestClient  # noqa: E402

from data import spec  # noqa: E402
from data.io import decode_image  # noqa: E402
from data.stream import prepare_image  # noqa: E402
from pipeline.analysis import analyse_batch  # noqa: E402
from pipeline.serve import ServeSettings, create_app  # noqa: E402


@pytest.fixture(scope="module")
def models(loaded_bundles):
    return loaded_bundles


@pytest.fixture(scope="module")
def client(models):
    clf, seg = models
    # segment_all: every upload goes through stage 2 too, so the mask path is always exercised.
    app = create_app(clf, seg, seg, settings=ServeSettings(segment_all=True, max_wait_ms=300,
                                                           max_upload_bytes=2_000_000))
    with TestClient(app) as c:
        yield c


def _post(client, data: bytes, name: str = "x.png", content_type: str = "image/png"):
    return client.post("/v1/predict", files={"file": (name, data, content_type)})


def _png_size(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


def _reference(models, data: bytes):
    """The same image through analyse_batch alone (what `cxr run` computes)."""
    clf, seg = models
    p = prepare_image(decode_image(data), size=clf.image_size, mode=clf.resize_mode, clahe=clf.clahe)
    return analyse_batch(p.x[None], [p.original], [p.geometry], classifier=clf, segmenter=seg, lung_model=seg,
                         segment_all=True)[0]


def test_health_and_openapi(client, models):
    h = client.get("/v1/health")
    assert h.status_code == 200
    body = h.json()
    assert body["status"] == "ok" and body["classes"] == list(spec.CLASS_NAMES)
    assert body["models"]["classifier"] == models[0].checkpoint_sha256
    schema = client.get("/openapi.json").json()
    post = schema["paths"]["/v1/predict"]["post"]
    assert "multipart/form-data" in post["requestBody"]["content"]
    assert {"413", "415", "422"} <= set(post["responses"])
    props = schema["components"]["schemas"]["Prediction"]["properties"]
    assert {"label", "probabilities", "confidence", "refer", "refer_reason", "segmented", "lesions",
            "lung_affected_pct", "urls"} <= set(props)


def test_predict_png_matches_the_pipeline_and_serves_its_images(client, models):
    data = png_bytes(xray_like(120, 100, seed=7))
    r = _post(client, data)
    assert r.status_code == 200, r.text
    body = r.json()
    ref = _reference(models, data)
    assert list(body["probabilities"]) == list(spec.CLASS_NAMES)
    np.testing.assert_allclose([body["probabilities"][c] for c in spec.CLASS_NAMES], ref.probs, atol=1e-4)
    assert body["label"] == ref.label and body["confidence"] == pytest.approx(ref.probs.max(), abs=1e-4)
    assert (body["refer"], body["refer_reason"]) == (ref.refer, ref.refer_reason) and body["refer"] is not None
    assert (body["width"], body["height"]) == (100, 120)
    assert body["segmented"] and body["lesion_count"] == len(body["lesions"]) == ref.stage2_fields()["lesion_count"]
    assert body["lung_affected_pct"] == ref.stage2_fields()["lung_affected_pct"]  # the lung model ran, as in `cxr run`
    for key in ("gradcam", "mask", "mask_overlay"):
        img = client.get(body["urls"][key])
        assert img.status_code == 200 and img.headers["content-type"] == "image/png"
        assert _png_size(img.content) == (100, 120)  # at the uploaded image's size
    mask = np.asarray(Image.open(io.BytesIO(client.get(body["urls"]["mask"]).content)))
    np.testing.assert_array_equal(mask > 0, ref.seg.mask)


def test_results_are_per_request_and_not_guessable(client):
    a = _post(client, png_bytes(xray_like(96, 80, seed=1))).json()["urls"]["gradcam"]
    b = _post(client, png_bytes(xray_like(96, 80, seed=2))).json()["urls"]["gradcam"]
    token_a, token_b = a.split("/")[3], b.split("/")[3]
    assert token_a != token_b and len(token_a) >= 43  # 256 random bits, URL-safe base64
    assert client.get(a).content != client.get(b).content
    assert client.get(f"/v1/results/{token_a[:-1]}x/gradcam.png").status_code == 404
    assert client.get(f"/v1/results/{token_a}/model.json").status_code == 404
    assert client.get(f"/v1/results/{token_a}/..%2F..%2Fsetup.cfg").status_code == 404


@pytest.mark.parametrize("name", sorted(BAD_CORPUS_EXPECT))
def test_bad_corpus_gets_the_right_status(client, bad_corpus, name):
    expect = BAD_CORPUS_EXPECT[name]
    r = _post(client, (bad_corpus / name).read_bytes(), name=name)
    if expect == "ok":
        assert r.status_code == 200, r.text
    else:
        status = 415 if expect == "not an image" else 422
        assert r.status_code == status, r.text
        assert expect in r.json()["detail"]
        assert name not in r.text  # the client's file name is never echoed
        assert "\n" not in r.json()["detail"] and " at 0x" not in r.text  # one line, no object reprs


def test_content_decides_not_the_name_or_declared_type(client):
    png = png_bytes(xray_like(96, 80, seed=3))
    assert _post(client, png, name="scan.dcm", content_type="application/dicom").status_code == 200
    r = _post(client, b"<html>not an x-ray</html>" * 10, name="scan.png", content_type="image/png")
    assert r.status_code == 415 and "judged by the bytes" in r.json()["detail"]
    assert _post(client, png, name="../../etc/passwd").status_code == 200  # the name is never used


def test_dicom_patient_tags_are_never_echoed(client, tmp_path):
    path = tmp_path / "p.dcm"
    write_monochrome1_dicom(path, (np.arange(96 * 80).reshape(96, 80) % 4096))
    r = _post(client, path.read_bytes(), name="Doe^Jane.dcm", content_type="application/dicom")
    assert r.status_code == 200, r.text
    assert "Doe" not in r.text and "SECRET-123" not in r.text and "Jane" not in r.text


def test_too_large_is_413_declared_or_streamed(client):
    big = b"\x89PNG\r\n\x1a\n" + bytes(2_100_000)
    r = _post(client, big)
    assert r.status_code == 413  # FastAPI's max_body_size, from the declared Content-Length

    def chunks():  # no Content-Length: the limit is enforced while the body streams in
        yield b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n\r\n"
        for _ in range(30):
            yield bytes(100_000)

    r = client.post("/v1/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413, r.text


def test_missing_file_field_is_422(client):
    assert client.post("/v1/predict", data={"other": "x"}).status_code == 422


def test_twenty_concurrent_uploads_each_get_their_own_answer(client, models):
    images = [png_bytes(xray_like(96 + i, 80 + 2 * i, seed=100 + i)) for i in range(20)]
    refs = [_reference(models, d) for d in images]
    engine = client.app.state.engine
    before = len(engine.batches)
    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(lambda d: _post(client, d), images))
    for i, (r, ref) in enumerate(zip(responses, refs)):
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["width"], body["height"]) == (80 + 2 * i, 96 + i)  # its own image, not a neighbour's
        np.testing.assert_allclose([body["probabilities"][c] for c in spec.CLASS_NAMES], ref.probs, atol=1e-4)
        assert body["lesion_count"] == ref.stage2_fields()["lesion_count"]
        assert _png_size(client.get(body["urls"]["gradcam"]).content) == (80 + 2 * i, 96 + i)
    batches = list(engine.batches)[before:]
    assert sum(batches) == 20 and max(batches) > 1  # requests were analysed together


# ---- the page in a real browser ---------------------------------------------------------------


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def live_server(models):
    import socket

    import uvicorn

    from pipeline.serve import uvicorn_config

    clf, seg = models
    settings = ServeSettings(segment_all=True, request_timeout_s=1.0)
    app = create_app(clf, seg, settings=settings)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app, settings, host="127.0.0.1", port=port))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    import time

    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=30)


def test_upload_page_in_headless_chromium(live_server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="browser test needs playwright (pip install -e .[test])")
    browser_path = _chromium()
    if browser_path is None:
        pytest.skip("no Debian chromium on this machine: `make test` installs it with apt-get where it can "
                    "(apt-get install chromium)")
    good = tmp_path / "xray.png"
    good.write_bytes(png_bytes(xray_like(120, 100, seed=11)))
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"just some text, not an image" * 8)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, headless=True, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(live_server + "/")
        assert "Not for diagnosis" in page.inner_text("body")
        page.set_input_files("#file", str(good))
        page.click("#submit")
        page.wait_for_selector("#result:not([hidden])", timeout=60_000)
        assert page.inner_text("#label") in spec.CLASS_NAMES
        assert page.locator("#bars .bar").count() == len(spec.CLASS_NAMES)
        page.wait_for_function("document.getElementById('gradcam').complete "
                               "&& document.getElementById('gradcam').naturalWidth === 100")
        page.wait_for_function("document.getElementById('maskimg').naturalWidth === 100")
        assert page.is_visible("#maskfig")
        page.set_input_files("#file", str(bad))
        page.click("#submit")
        page.wait_for_selector("#error:not([hidden])", timeout=30_000)
        assert "415" in page.inner_text("#error") and page.is_hidden("#result")
        browser.close()


def _closed_within(sock, seconds: float) -> bool:
    import socket
    import time

    sock.settimeout(seconds)
    t0 = time.monotonic()
    try:
        while sock.recv(4096):
            pass
    except (socket.timeout, TimeoutError):
        return False
    except ConnectionResetError:
        pass
    return time.monotonic() - t0 < seconds


def test_slow_clients_are_cut_off_at_the_deadline(live_server):
    """A client that never finishes its headers or body is disconnected (request_timeout_s = 1 here);
    a client that sends its request in time is answered even though its analysis takes longer."""
    import socket

    host, port = live_server.removeprefix("http://").split(":")
    headers_only = socket.create_connection((host, int(port)))
    headers_only.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\n")
    body_stalled = socket.create_connection((host, int(port)))
    body_stalled.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                         b"Content-Length: 100000\r\n\r\n--b\r\n")
    silent = socket.create_connection((host, int(port)))
    try:
        assert all(_closed_within(s, 5.0) for s in (headers_only, body_stalled, silent))
    finally:
        for s in (headers_only, body_stalled, silent):
            s.close()
    import httpx2 as httpx

    r = httpx.post(live_server + "/v1/predict", files={"file": ("x.png", png_bytes(xray_like(96, 80, seed=9)))},
                   timeout=60)
    assert r.status_code == 200


def test_validation_errors_never_echo_the_upload(client):
    secret = "PATIENT-NAME-" + "A" * 4000
    r = client.post("/v1/predict", data={"file": secret})  # sent as a plain form field, not a file
    assert r.status_code == 422
    assert "PATIENT-NAME" not in r.text and len(r.content) < 1000
    assert r.json()["detail"][0]["loc"] == ["body", "file"]


def test_result_store_is_bounded_in_bytes():
    from pipeline import serve

    store = serve.ResultStore(ttl_s=60, max_items=100, max_bytes=10)
    a = store.put({"gradcam.png": b"123456"})
    b = store.put({"gradcam.png": b"abcdef"})  # 12 bytes together: the oldest goes
    assert store.get(a, "gradcam.png") is None and store.get(b, "gradcam.png") == b"abcdef"
    assert len(store) == 1 and store.bytes == 6
    c = store.put({"gradcam.png": b"x" * 50})  # larger than the budget alone: kept, the only one
    assert store.get(c, "gradcam.png") and len(store) == 1 and store.bytes == 50


def test_cli_serve_refuses_unusable_models_before_starting(tmp_path, light_bundle, capsys):
    from pipeline.cli import main

    broken = tmp_path / "broken"
    shutil.copytree(light_bundle, broken)
    meta = json.loads((broken / "model.json").read_text())
    meta["class_names"] = ["a", "b", "c"]
    (broken / "model.json").write_text(json.dumps(meta))
    assert main(["serve", "--classifier", str(broken), "--segmenter", str(light_bundle)]) == 2
    assert "cxr: error:" in capsys.readouterr().err


def test_full_queue_is_503(models):
    clf, seg = models
    with TestClient(create_app(clf, seg, settings=ServeSettings(max_queue=0))) as c:
        r = _post(c, png_bytes(xray_like(96, 80)))
    assert r.status_code == 503 and "busy" in r.json()["detail"]


def test_result_store_expires_and_caps(monkeypatch):
    from pipeline import serve

    now = [1000.0]
    monkeypatch.setattr(serve.time, "monotonic", lambda: now[0])
    store = serve.ResultStore(ttl_s=60, max_items=2)
    a = store.put({"gradcam.png": b"a"})
    b = store.put({"gradcam.png": b"b"})
    c = store.put({"gradcam.png": b"c"})  # over the cap: the oldest goes
    assert store.get(a, "gradcam.png") is None and store.get(b, "gradcam.png") == b"b"
    now[0] += 61
    assert store.get(c, "gradcam.png") is None  # expired
