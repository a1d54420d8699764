"""End to end: one real server (2 workers) with the image and the text model side by side."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from .test_serve import classify, metric

pytestmark = pytest.mark.slow

TEXTS = ["Guten Morgen, wie geht es Ihnen?", "merci beaucoup", "Hello there, how are you doing?",
         "Спасибо большое за помощь", "dziękuję " * 30, "grazie mille", "tak"]


def classify_text(url: str, texts: list[str], client: httpx.Client) -> httpx.Response:
    return client.post(f"{url}/v1/classify/text", json={"texts": texts}, timeout=30)


def test_text_and_image_requests_together_and_metrics_for_both_models(server, digit_pngs):
    before = httpx.get(f"{server.url}/metrics").text
    n_clients, per_client = 16, 5

    def client_loop(i: int) -> list[int]:
        codes = []
        with httpx.Client() as client:
            for j in range(per_client):
                texts = [TEXTS[(i + j + m) % len(TEXTS)] for m in range(1 + (i + j) % 3)]
                response = classify_text(server.url, texts, client)
                assert len(response.json()["predictions"]) == len(texts)
                codes.append(response.status_code)
                codes.append(classify(server.url, digit_pngs[i % len(digit_pngs)][0], client).status_code)
        return codes

    with ThreadPoolExecutor(n_clients) as pool:
        codes = [c for codes in pool.map(client_loop, range(n_clients)) for c in codes]
    assert codes == [200] * (2 * n_clients * per_client)

    after = httpx.get(f"{server.url}/metrics").text
    texts_sent = sum(1 + (i + j) % 3 for i in range(n_clients) for j in range(per_client))
    served = {m: metric(after, "clf_predictions_total", model=m) - metric(before, "clf_predictions_total", model=m)
              for m in ("digits-cnn", "lang-tiny")}
    assert served == {"digits-cnn": n_clients * per_client, "lang-tiny": texts_sent}
    items = (metric(after, "clf_batch_size_items_sum", model="lang-tiny")
             - metric(before, "clf_batch_size_items_sum", model="lang-tiny"))
    assert items == texts_sent
    for name in ("clf_queue_wait_seconds_count", "clf_inference_seconds_count",
                 "clf_preprocess_seconds_count", "clf_prediction_confidence_count"):
        assert metric(after, name, model="lang-tiny") > metric(before, name, model="lang-tiny"), name
    assert 'clf_model_info{' in after and 'model="lang-tiny"' in after
    models = {m["name"] for m in httpx.get(f"{server.url}/v1/models").json()["models"]}
    assert models == {"digits-cnn", "lang-tiny"}


def test_a_text_in_its_charset_or_compressed_is_classified_as_in_utf_8(server):
    import gzip

    url, text = f"{server.url}/v1/classify/text", "Qu'est-ce que c'est, ça? Déjà vu."
    plain = {"Content-Type": "text/plain"}
    answers = [httpx.post(url, timeout=30, content=content, headers={**plain, **extra})
               for content, extra in [
                   (text.encode(), {}),
                   (text.encode("latin-1"), {"Content-Type": "text/plain; charset=iso-8859-1"}),
                   (text.encode("utf-16"), {"Content-Type": "text/plain; charset=utf-16"}),
                   (gzip.compress(text.encode()), {"Content-Encoding": "gzip"})]]
    for answer in answers:
        assert answer.status_code == 200, answer.text
        assert answer.json()["predictions"] == answers[0].json()["predictions"]


def test_bad_text_inputs_get_4xx_and_the_server_keeps_serving(server):
    url = f"{server.url}/v1/classify/text"
    cases = {
        "empty string": (dict(json={"text": ""}), 422),
        "whitespace only": (dict(json={"texts": ["ok", "   \n"]}), 422),
        "over max_chars": (dict(json={"text": "a" * 10_001}), 413),
        "invalid UTF-8": (dict(content=b'{"text": "\xc3\x28"}', headers={"Content-Type": "application/json"}), 422),
        "NUL": (dict(json={"text": "a\u0000b"}), 422),
        "number": (dict(json={"text": 7}), 422),
        "too many texts": (dict(json={"texts": ["a"] * 17}), 413),
        "unknown charset": (dict(content=b"hello", headers={
            "Content-Type": "text/plain; charset=klingon"}), 415),
        "not the named charset": (dict(content=b"\xff\xfe\x00", headers={
            "Content-Type": "text/plain; charset=utf-16"}), 422),
        "unknown coding": (dict(content=b"hello", headers={
            "Content-Type": "text/plain", "Content-Encoding": "br"}), 415),
    }
    before = httpx.get(f"{server.url}/metrics").text
    with httpx.Client() as client:
        for name, (kwargs, status) in cases.items():
            response = client.post(url, timeout=30, **kwargs)
            assert response.status_code == status, (name, response.text)
            assert response.json()["error"]["message"], name
            assert classify_text(server.url, ["still here"], client).status_code == 200, name
    after = httpx.get(f"{server.url}/metrics").text
    rejected = (metric(after, "clf_rejected_inputs_total", model="lang-tiny")
                - metric(before, "clf_rejected_inputs_total", model="lang-tiny"))
    assert rejected == len(cases)
