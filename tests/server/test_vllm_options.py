"""A `vllm serve` launch line runs under `tuili serve` where tuili has the feature, and fails with what
to use instead where it does not; CORS, --max-model-len, --seed and vLLM's metric names do what
vLLM's do."""

import httpx
import pytest
from live import MODEL, live_server

from tuili.cli import parser, vllm_options
from tuili.engine import LLM, SamplingParams
from tuili.server import ServerConfig

LINE = (
    "serve --model default --served-model-name smollm2 chat --max-model-len 1024 --seed 7 "
    '--generation-config vllm --allowed-origins ["https://a.example"] --allow-credentials --trust-remote-code '
    "--enforce-eager --disable-log-requests --disable-log-stats --no-enable-prefix-caching --block-size 32 "
    "--uvicorn-log-level warning --tensor-parallel-size 1 --max-num-seqs 8 "
    "--enable-auto-tool-choice --tool-call-parser llama3_json"
)


def test_a_vllm_launch_line_parses_into_tuilis_options():
    args = parser().parse_args(LINE.split())
    vllm_options.check(args)
    assert args.served_model_name == ["smollm2", "chat"]
    assert (args.max_model_len, args.seed, args.block_size, args.enable_prefix_caching) == (1024, 7, 32, False)
    assert args.log_level == "warning" and args.tool_call_parser == "llama3_json"
    assert vllm_options.cors(args) == {
        "allow_origins": ["https://a.example"],
        "allow_methods": ["*"],
        "allow_headers": ["*"],
        "allow_credentials": True,
    }


@pytest.mark.parametrize(
    "extra, words",
    [
        ("--tensor-parallel-size 2", "one process"),
        ("--quantization awq", "tuili quantize"),
        ("--gpu-memory-utilization 0.9", "--kv-cache-gb"),
        ("--generation-config auto", "--generation-config vllm"),
        ("--ssl-keyfile k.pem", "--ssl-certfile"),
        ("--max-model-len 0", "positive"),
    ],
)
def test_vllm_options_for_features_tuili_lacks_fail_with_what_to_use(extra, words):
    args = parser().parse_args(["serve", *extra.split()])
    with pytest.raises(ValueError, match=words):
        vllm_options.check(args)


@pytest.mark.parametrize(
    "line, expected",
    [
        (
            '--speculative-config {"method":"ngram","num_speculative_tokens":5,"prompt_lookup_max":3}',
            ("ngram", 5, 3, None),
        ),
        ('--speculative-config {"model":"draft-folder","num_speculative_tokens":3}', ("draft", 3, 4, "draft-folder")),
        ("--speculative-model [ngram] --num-speculative-tokens 6 --ngram-prompt-lookup-max 2", ("ngram", 6, 2, None)),
        ("--speculative-model draft-folder", ("draft", 4, 4, "draft-folder")),
    ],
)
def test_vllm_speculative_options(line, expected):
    config = vllm_options.speculative(parser().parse_args(["serve", *line.split()]))
    assert (config.method, config.num_speculative_tokens, config.prompt_lookup_max, config.draft_model) == expected


@pytest.mark.parametrize(
    "line, words",
    [
        ('--speculative-config {"method":"eagle","model":"x"}', "method 'eagle'"),
        ('--speculative-config {"method":"ngram","acceptance_method":"typical"}', "acceptance_method"),
        ("--speculative-config nope", "not JSON"),
        ("--num-speculative-tokens 3", "need a method"),
        ("--speculative-model ngram --num-speculative-tokens 40", "num_speculative_tokens"),
    ],
)
def test_speculative_options_tuili_cannot_honour_are_refused(line, words):
    with pytest.raises(ValueError, match=words):
        vllm_options.speculative(parser().parse_args(["serve", *line.split()]))


def test_a_tool_call_format_tuili_lacks_is_refused_with_the_ones_it_has(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["serve", "--tool-call-parser", "mistral"])
    assert "'hermes', 'llama3_json'" in capsys.readouterr().err


def test_a_chat_template_is_text_or_a_file(tmp_path):
    template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    (tmp_path / "t.jinja").write_text(template)
    assert vllm_options.chat_template(str(tmp_path / "t.jinja")) == template
    assert vllm_options.chat_template(template) == template
    with pytest.raises(ValueError, match="neither a file"):
        vllm_options.chat_template("missing.jinja")


def test_cors_max_model_len_and_vllm_metric_names(tiny_model):
    config = ServerConfig(
        model_names=(MODEL,),
        max_model_len=40,
        cors={"allow_origins": ["https://a.example"], "allow_methods": ["*"], "allow_headers": ["*"]},
        metrics_names="vllm",
        api_key="secret",
    )
    with live_server(tiny_model, config) as (base, _):
        preflight = httpx.options(
            f"{base}/v1/completions",
            headers={"Origin": "https://a.example", "Access-Control-Request-Method": "POST"},
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://a.example"
        auth = {"Authorization": "Bearer secret"}
        body = {"model": MODEL, "prompt": "x" * 30, "max_tokens": 20}
        r = httpx.post(f"{base}/v1/completions", json=body, headers=auth)
        assert r.status_code == 400 and "40-token context" in r.json()["error"]["message"]
        assert httpx.post(f"{base}/v1/completions", json={**body, "max_tokens": 5}, headers=auth).status_code == 200
        assert httpx.get(f"{base}/v1/models", headers=auth).json()["data"][0]["max_model_len"] == 40
        text = httpx.get(f"{base}/metrics").text
        assert f'vllm:num_requests_running{{model_name="{MODEL}"}}' in text
        assert f'vllm:request_success_total{{finished_reason="length",model_name="{MODEL}"}}' in text
        assert "tuili_" not in text


def test_an_engine_seed_makes_unseeded_requests_reproducible(tiny_model):
    params = SamplingParams(max_tokens=8, temperature=1.0)
    runs = [LLM(tiny_model, seed=7).generate(["a", "b"], params) for _ in range(2)]
    assert [c.token_ids for c in runs[0]] == [c.token_ids for c in runs[1]]
    other = LLM(tiny_model, seed=8).generate(["a", "b"], params)
    assert [c.token_ids for c in other] != [c.token_ids for c in runs[0]]
