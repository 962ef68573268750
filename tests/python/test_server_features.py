"""Server features real clients use, checked against independent references: logprobs (chat and completions,
echo with prompt logprobs, max_tokens 0) equal log_softmax of `dsv3 logits` (1e-4), a transformers fixture's
log-likelihoods (1e-4), n > 1, logit_bias and presence/frequency penalties (the processed logits, recomputed
here), API keys, body and prompt limits, tool calls parsed into `tool_calls` (official openai client,
streaming and not) from a steered model whose output is known, R1 reasoning, and OpenAI-style errors after
which the server keeps serving."""
import json
import math
import pathlib
import urllib.error
import urllib.request

import numpy as np
import pytest
import subprocess

from steered_model import copy_tokenizer, make_steered, small_config
from test_server import client, post, start_server, stop_server

openai = pytest.importorskip("openai")
torch = pytest.importorskip("torch")
from safetensors.numpy import load_file, save_file  # noqa: E402

ATOL = 1e-4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, dsv3_bin, test_data):
    d = tmp_path_factory.mktemp("feat")
    small_config(test_data, d / "config.json")
    subprocess.run([dsv3_bin, "init", "--config", str(d / "config.json"), "--output", str(d / "m"), "--seed", "3",
                    "--dtype", "f32"], check=True)
    copy_tokenizer(d / "m")
    return d / "m"


@pytest.fixture(scope="module")
def server(dsv3_bin, model_dir):
    p, base = start_server(dsv3_bin, model_dir, "--max-n", "8")
    yield base
    stop_server(p)


def log_softmax_rows(dsv3_bin, model_dir, ids, tmp):
    """fp64 log_softmax of `dsv3 logits` for one sequence: [T, V]."""
    save_file({"input_ids": np.array([ids], dtype=np.int32)}, str(tmp / "in.safetensors"))
    subprocess.run([dsv3_bin, "logits", "--model", str(model_dir), "--input", str(tmp / "in.safetensors"),
                    "--output", str(tmp / "out.safetensors")], check=True)
    lg = load_file(str(tmp / "out.safetensors"))["logits"][0].astype(np.float64)
    return lg - np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lg.max(-1, keepdims=True)


def test_echo_prompt_logprobs_equal_log_softmax_of_dsv3_logits(server, dsv3_bin, model_dir, tmp_path):
    ids = [0, 5021, 300, 77, 12000, 9, 40000, 3]
    code, r = post(server, "/v1/completions", {"model": "tiny", "prompt": ids, "max_tokens": 0, "echo": True,
                                                "logprobs": 3, "temperature": 0})
    assert code == 200, r
    lp = r["choices"][0]["logprobs"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert len(lp["token_logprobs"]) == len(ids) and r["usage"]["completion_tokens"] == 0
    ref = log_softmax_rows(dsv3_bin, model_dir, ids, tmp_path)
    for t in range(1, len(ids)):
        assert abs(lp["token_logprobs"][t] - ref[t - 1, ids[t]]) < ATOL
        top = sorted(lp["top_logprobs"][t].values(), reverse=True)
        assert np.allclose(top, np.sort(ref[t - 1])[::-1][:3], atol=ATOL)


def test_generated_logprobs_both_endpoints(server, dsv3_bin, model_dir, tmp_path):
    c = client(server)
    prompt = [0, 1000, 2000, 3000]
    r = c.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0, logprobs=2, echo=True,
                             extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(prompt) + 6
    out = json.loads(subprocess.run([dsv3_bin, "generate", "--model", str(model_dir), "--prompt-ids", "0,1000,2000,3000",
                                     "-n", "6", "--temperature", "0", "--json", "--ignore-eos"], capture_output=True,
                                    text=True, check=True).stdout)["output_ids"]
    full = prompt + out
    ref = log_softmax_rows(dsv3_bin, model_dir, full, tmp_path)
    for t in range(1, len(full)):
        assert abs(lp.token_logprobs[t] - ref[t - 1, full[t]]) < ATOL
    # Greedy: the chosen token is the top alternative, and echo puts the prompt before the output.
    for t in range(len(prompt), len(full)):
        assert abs(max(lp.top_logprobs[t].values()) - lp.token_logprobs[t]) < 1e-6
    # Chat: logprobs.content for each generated token, with top_logprobs and bytes.
    ch = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                   temperature=0, logprobs=True, top_logprobs=4)
    content = ch.choices[0].logprobs.content
    assert len(content) == ch.usage.completion_tokens
    for e in content:
        assert len(e.top_logprobs) == 4 and e.top_logprobs[0].logprob >= e.top_logprobs[-1].logprob
        assert abs(e.top_logprobs[0].logprob - e.logprob) < 1e-6 and e.bytes is not None
    # Streaming chunks carry the same logprobs.
    s = [x for x in c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                              temperature=0, logprobs=True, top_logprobs=4, stream=True)]
    streamed = [e.logprob for x in s if x.choices and x.choices[0].logprobs for e in x.choices[0].logprobs.content]
    assert np.allclose(streamed, [e.logprob for e in content], atol=1e-6)


def test_fixture_loglikelihoods_equal_transformers(dsv3_bin, test_data, tmp_path):
    """tiny-fp32's reference logits come from transformers: echo logprobs over its input ids must equal their
    log_softmax (1e-4), with the prompt prefilled in chunks of 3 tokens. The fixture has a 2048-token vocabulary: a
    byte-level tokenizer of 258 tokens serves it."""
    from dsv3_cli import minimal_tokenizer_dir
    ref = load_file(str(test_data / "tiny-fp32" / "reference.safetensors"))
    ids = ref["input_ids"][0].astype(int).tolist()
    lg = ref["logits"][0].astype(np.float64)
    lsm = lg - lg.max(-1, keepdims=True)
    lsm -= np.log(np.exp(lsm).sum(-1, keepdims=True))
    tok_dir = tmp_path / "tok"
    minimal_tokenizer_dir(tok_dir, "{{ messages }}")
    p, base = start_server(dsv3_bin, test_data / "tiny-fp32", "--tokenizer", str(tok_dir), "--prefill-chunk", "3")
    try:
        code, r = post(base, "/v1/completions", {"model": "tiny", "prompt": ids, "max_tokens": 0, "echo": True,
                                                  "logprobs": 1})
        assert code == 200, r
        got = r["choices"][0]["logprobs"]["token_logprobs"]
        for t in range(1, len(ids)):
            assert abs(got[t] - lsm[t - 1, ids[t]]) < ATOL, t
    finally:
        stop_server(p)


def test_n_choices_and_batched_prompts(server):
    c = client(server)
    r = c.completions.create(model="tiny", prompt="Once", max_tokens=8, temperature=1.0, seed=11, n=3)
    assert sorted(ch.index for ch in r.choices) == [0, 1, 2]
    # Choice j uses seed + j: the same as asking for n = 1 with that seed.
    for j in range(3):
        one = c.completions.create(model="tiny", prompt="Once", max_tokens=8, temperature=1.0, seed=11 + j)
        assert one.choices[0].text == r.choices[j].text
    # A list of prompts with n = 2: index = prompt * n + j; prompt tokens counted once per prompt.
    code, b = post(server, "/v1/completions", {"model": "tiny", "prompt": ["a", "b c"], "n": 2, "max_tokens": 3,
                                                "temperature": 0, "ignore_eos": True})
    assert code == 200 and [ch["index"] for ch in b["choices"]] == [0, 1, 2, 3]
    assert b["choices"][0]["text"] == b["choices"][1]["text"] and b["usage"]["completion_tokens"] == 12
    # Streaming n = 2: both indexes finish.
    fin = {}
    for ch in c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], n=2, max_tokens=4,
                                        temperature=0, stream=True):
        for x in ch.choices:
            if x.finish_reason:
                fin[x.index] = x.finish_reason
    assert sorted(fin) == [0, 1]


def test_logit_bias_and_penalties_follow_the_processed_logits(server, dsv3_bin, model_dir, tmp_path):
    c = client(server)
    r = c.completions.create(model="tiny", prompt=[0, 10, 20], max_tokens=5, temperature=0,
                             logit_bias={"4242": 100}, extra_body={"ignore_eos": True})
    from tokenizers import Tokenizer
    t = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    assert r.choices[0].text == t.decode([4242] * 5) and r.usage.completion_tokens == 5
    # Penalties: greedy decoding over logits - freq * count - presence * [count > 0], recomputed from dsv3 logits.
    prompt = [0, 10, 20]
    code, pen = post(server, "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 6, "temperature": 0,
                                                  "frequency_penalty": 1.5, "presence_penalty": 0.5, "logprobs": 0,
                                                  "ignore_eos": True})
    assert code == 200, pen
    lps = pen["choices"][0]["logprobs"]["token_logprobs"]
    toks = []
    for step in range(6):
        ids = prompt + toks
        save_file({"input_ids": np.array([ids], dtype=np.int32)}, str(tmp_path / "in.safetensors"))
        subprocess.run([dsv3_bin, "logits", "--model", str(model_dir), "--input", str(tmp_path / "in.safetensors"),
                        "--output", str(tmp_path / "out.safetensors")], check=True)
        lg = load_file(str(tmp_path / "out.safetensors"))["logits"][0, -1].astype(np.float64)
        for t in set(toks):
            lg[t] -= 1.5 * toks.count(t) + 0.5
        nxt = int(np.argmax(lg))
        lsm = lg - lg.max() - math.log(np.exp(lg - lg.max()).sum())
        assert abs(lps[step] - lsm[nxt]) < ATOL
        toks.append(nxt)


@pytest.mark.parametrize("body,param", [
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs": True}, "logprobs"),
    ({"n": 9}, "n"),
    ({"n": 0}, "n"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": "x"}, "frequency_penalty"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": [1]}, "logit_bias"),
    ({"echo": True, "stream": True}, "echo"),
    ({"max_tokens": 0}, "max_tokens"),
])
def test_bad_sampling_requests(server, body, param):
    code, err = post(server, "/v1/completions", {"model": "tiny", "prompt": "x", **body})
    assert code == 400 and err["error"]["param"] == param and err["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("body,param", [
    ({"tools": {"type": "function"}}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "tools"),
    ({"tools": [{"type": "retrieval"}]}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
])
def test_bad_chat_tool_and_logprob_requests(server, body, param):
    code, err = post(server, "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], **body})
    assert code == 400 and err["error"]["param"] == param
    # ... and the server keeps serving.
    assert client(server).completions.create(model="tiny", prompt="ok", max_tokens=2).usage.completion_tokens >= 1


def raw(base, path, body, headers):
    req = urllib.request.Request(base + path, data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_api_key_body_and_prompt_limits(dsv3_bin, model_dir):
    p, base = start_server(dsv3_bin, model_dir, "--api-key", "sekrit", "--max-body-bytes", "4096",
                           "--max-prompt-tokens", "16")
    try:
        body = json.dumps({"model": "tiny", "prompt": "hello", "max_tokens": 2}).encode()
        hj = {"Content-Type": "application/json"}
        code, out = raw(base, "/v1/completions", body, hj)
        assert code == 401 and json.loads(out)["error"]["code"] == "invalid_api_key"
        code, out = raw(base, "/v1/completions", body, {**hj, "Authorization": "Bearer wrong"})
        assert code == 401 and "message" in json.loads(out)["error"]
        code, out = raw(base, "/v1/models", None, {})
        assert code == 401
        assert urllib.request.urlopen(base + "/health", timeout=10).status == 200  # open for load balancers
        ok = openai.OpenAI(base_url=base + "/v1", api_key="sekrit", max_retries=0)
        assert ok.completions.create(model="tiny", prompt="hello", max_tokens=2).usage.completion_tokens >= 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base + "/v1", api_key="nope", max_retries=0).models.list()
        auth = {**hj, "Authorization": "Bearer sekrit"}
        big = json.dumps({"model": "tiny", "prompt": "x" * 10000}).encode()
        code, out = raw(base, "/v1/completions", big, auth)
        assert code == 413 and "message" in json.loads(out)["error"]
        long_prompt = json.dumps({"model": "tiny", "prompt": list(range(1, 30)), "max_tokens": 1}).encode()
        code, out = raw(base, "/v1/completions", long_prompt, auth)
        assert code == 400 and json.loads(out)["error"]["param"] == "prompt"
        assert ok.completions.create(model="tiny", prompt="still here", max_tokens=2).usage.completion_tokens >= 1
    finally:
        stop_server(p)


# Token ids in DeepSeek-V3's tokenizer (tests/python checks them against `tokenizers` below).
CALL_TAIL = [24313, 37399, 3362, 582, 51119, 60676, 9854, 128809, 128807]  # {"city": "Paris"}\n```<end><ends>
THINK = [128804, 74, 6002, 1718, 37947, 32, 633]  # <｜Assistant｜> -> hmm</think>ok


@pytest.fixture(scope="module")
def steered(tmp_path_factory, dsv3_bin, test_data):
    from tokenizers import Tokenizer
    t = Tokenizer.from_file(str(pathlib.Path(__file__).resolve().parents[2] / "data/tokenizers/deepseek-v3/tokenizer.json"))
    assert t.decode(CALL_TAIL[:6]) == '{"city": "Paris"}\n' and t.decode(THINK[1:]) == "hmm</think>ok"
    eos = json.loads((test_data / "tiny-mtp" / "config.json").read_text())["eos_token_id"]
    d = tmp_path_factory.mktemp("steer")
    # After the forced prefix "...get_weather\n```json\n" (last token "\n" = 201) comes the arguments and the end.
    m = make_steered(dsv3_bin, test_data, d, [[201] + CALL_TAIL + [eos], THINK + [eos]])
    return m


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def test_tool_calls_with_the_openai_client(dsv3_bin, steered):
    p, base = start_server(dsv3_bin, steered)
    try:
        c = client(base)
        msgs = [{"role": "user", "content": "Weather in Paris?"}]
        choice = {"type": "function", "function": {"name": "get_weather"}}
        r = c.chat.completions.create(model="tiny", messages=msgs, tools=TOOLS, tool_choice=choice, max_tokens=32,
                                      temperature=0)
        ch = r.choices[0]
        assert ch.finish_reason == "tool_calls", ch
        assert ch.message.content is None and len(ch.message.tool_calls) == 1
        call = ch.message.tool_calls[0]
        assert call.type == "function" and call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Paris"} and call.id
        # Streaming: the deltas assemble into the same call and the last chunk says tool_calls.
        name, args, fin = "", "", None
        for chunk in c.chat.completions.create(model="tiny", messages=msgs, tools=TOOLS, tool_choice=choice,
                                               max_tokens=32, temperature=0, stream=True):
            for x in chunk.choices:
                for tc in x.delta.tool_calls or []:
                    name += tc.function.name or ""
                    args += tc.function.arguments or ""
                fin = x.finish_reason or fin
        assert name == "get_weather" and json.loads(args) == {"city": "Paris"} and fin == "tool_calls"
        # The conversation continues with the tool's answer rendered by the chat template.
        msgs2 = msgs + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                        {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
        r2 = c.chat.completions.create(model="tiny", messages=msgs2, tools=TOOLS, max_tokens=4, temperature=0)
        assert r2.choices[0].finish_reason in ("stop", "length", "tool_calls")
        # tool_choice none: no tools in the prompt and no parsing; without tools the prompt is shorter.
        a = c.chat.completions.create(model="tiny", messages=msgs, tools=TOOLS, tool_choice="none", max_tokens=2)
        b = c.chat.completions.create(model="tiny", messages=msgs, tools=TOOLS, max_tokens=2)
        assert b.usage.prompt_tokens > a.usage.prompt_tokens
    finally:
        stop_server(p)


def test_reasoning_parser(dsv3_bin, steered):
    p, base = start_server(dsv3_bin, steered, "--reasoning-parser", "deepseek-r1")
    try:
        code, r = post(base, "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}],
                                                      "max_tokens": 16, "temperature": 0})
        m = r["choices"][0]["message"]
        assert m["reasoning_content"] == "hmm" and m["content"] == "ok", m
        c = client(base)
        reason, content = "", ""
        for chunk in c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=16,
                                               temperature=0, stream=True):
            for x in chunk.choices:
                reason += getattr(x.delta, "reasoning_content", None) or ""
                content += x.delta.content or ""
        assert reason == "hmm" and content == "ok"
    finally:
        stop_server(p)


def test_disconnect_with_n_choices_frees_every_sequence(server):
    import socket
    import time
    from test_server import metric
    port = int(server.rsplit(":", 1)[1])
    before = metric(server, "dsv3_requests_cancelled_total")
    s = socket.create_connection(("127.0.0.1", port))
    body = json.dumps({"model": "tiny", "prompt": "hello", "max_tokens": 900, "stream": True, "ignore_eos": True, "n": 3,
                       "logprobs": 2})
    s.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n{body}").encode())
    s.recv(4096)
    s.close()
    for _ in range(200):
        if metric(server, "dsv3_requests_cancelled_total") >= before + 3 and metric(server, "dsv3_kv_cache_blocks_used") == 0:
            break
        time.sleep(0.05)
    assert metric(server, "dsv3_requests_cancelled_total") >= before + 3
    assert metric(server, "dsv3_kv_cache_blocks_used") == 0
