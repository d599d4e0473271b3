"""tuili's own endpoints: log-likelihood scoring, health and readiness, Prometheus metrics."""

import httpx
import pytest
from live import MODEL, samples

from tuili.engine.pooling import loglikelihood


def test_loglikelihood_endpoint_equals_the_engine(base, tiny_model):
    pairs = [{"context": "the cat", "continuation": " sat"}, {"context": "x", "continuation": "yz"}]
    r = httpx.post(f"{base}/v1/loglikelihood", json={"model": MODEL, "input": pairs, "top_logprobs": 2})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    tok = tiny_model.tokenizer
    expected = loglikelihood(tiny_model, [(tok.encode(p["context"]), tok.encode(p["continuation"])) for p in pairs], 2)
    for entry, score, pair in zip(data, expected, pairs):
        assert entry["logprob"] == pytest.approx(score.logprob, abs=1e-4)
        assert entry["is_greedy"] == score.is_greedy
        assert entry["num_tokens"] == len(pair["continuation"]) == len(entry["token_logprobs"])
        assert all(len(top) <= 2 for top in entry["top_logprobs"])
    single = httpx.post(f"{base}/v1/loglikelihood", json={"model": MODEL, "input": pairs[0]}).json()["data"][0]
    assert single["logprob"] == pytest.approx(data[0]["logprob"], abs=1e-4) and "top_logprobs" not in single


def test_loglikelihood_errors(base):
    r = httpx.post(f"{base}/v1/loglikelihood", json={"model": MODEL, "input": {"context": "", "continuation": "a"}})
    assert r.status_code == 400 and "context is empty" in r.json()["error"]["message"]
    r = httpx.post(f"{base}/v1/loglikelihood", json={"model": MODEL, "input": []})
    assert r.status_code == 400 and "empty" in r.json()["error"]["message"]


def test_embedding_errors(base):
    r = httpx.post(f"{base}/v1/embeddings", json={"model": MODEL, "input": "a", "dimensions": 3})
    assert r.status_code == 400 and "64 dimensions" in r.json()["error"]["message"]
    r = httpx.post(f"{base}/v1/embeddings", json={"model": MODEL, "input": ""})
    assert r.status_code == 400 and "empty" in r.json()["error"]["message"]


def test_health_and_readiness(base):
    assert httpx.get(f"{base}/health").json() == {"status": "ok"}
    assert httpx.get(f"{base}/ready").json() == {"status": "ready"}


def test_metrics_count_requests_tokens_and_latencies(base):
    before = samples(base)
    body = {"model": MODEL, "prompt": "count me", "max_tokens": 7, "temperature": 0, "ignore_eos": True}
    assert httpx.post(f"{base}/v1/completions", json=body).status_code == 200
    assert httpx.post(f"{base}/v1/completions", json={**body, "model": "nope"}).status_code == 404
    after = samples(base)

    def grew(name):
        return after.get(name, 0) - before.get(name, 0)

    assert grew('tuili_http_requests_total{endpoint="/v1/completions",status="200"}') == 1
    assert grew('tuili_http_requests_total{endpoint="/v1/completions",status="404"}') == 1
    assert grew("tuili_generation_tokens_total") == 7
    assert grew("tuili_prompt_tokens_total") == len("count me")
    assert grew("tuili_time_to_first_token_seconds_count") == 1
    assert grew("tuili_inter_token_latency_seconds_count") == 6
    assert grew("tuili_e2e_request_latency_seconds_count") == 1
    assert grew("tuili_request_queue_time_seconds_count") == 1
    for gauge in (
        "tuili_num_requests_running",
        "tuili_num_requests_waiting",
        "tuili_kv_cache_usage_perc",
        "tuili_prefix_cache_hits_total",
        "tuili_prefix_cache_queries_total",
    ):
        assert gauge in after
    # the scheduling policy a client's latency depends on, and what the pacer has measured
    assert after["tuili_scheduler_max_num_seqs"] >= 1 and after["tuili_scheduler_max_num_batched_tokens"] >= 1
    assert after["tuili_scheduler_target_itl"] == pytest.approx(0.05)
    assert after["tuili_scheduler_decode_step_seconds"] > 0  # 6 decode-only steps were timed
    assert 1 <= after["tuili_scheduler_prefill_budget"] <= after["tuili_scheduler_max_num_batched_tokens"]


def test_model_card_version_and_tokenizer_info(base, tiny_model):
    import tuili

    card = httpx.get(f"{base}/v1/models/{MODEL}").json()
    assert card["id"] == MODEL and card["object"] == "model" and card["max_model_len"] > 0
    missing = httpx.get(f"{base}/v1/models/nope")
    assert missing.status_code == 404 and "nope" in missing.json()["error"]["message"]
    assert httpx.get(f"{base}/version").json() == {"version": tuili.__version__}
    info = httpx.get(f"{base}/tokenizer_info").json()
    assert info["eos_token"] == tiny_model.tokenizer.eos_token
    assert info["chat_template"] == tiny_model.tokenizer.chat_template
    # what lm-evaluation-harness's remote tokenizer does with it: the eos token's id by /tokenize
    ids = httpx.post(f"{base}/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False}).json()
    assert ids["tokens"] == [tiny_model.tokenizer.eos_token_id]
