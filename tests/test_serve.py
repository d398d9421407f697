"""``python -m fluid.serve`` on a tiny local stage-2 checkpoint, called with the real ``openai``
client on 127.0.0.1 (bounded: every request has a timeout, every server is stopped)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from fluid.serve.process import ServerProcess  # noqa: E402
from tests.conftest import ROOT, tiny_model  # noqa: E402

START_TIMEOUT_S = 90
PROMPTS = ["What is 3 + 4?", "Add 12 and 9.", "What is 7 - 2?", "Compute 5 + 5.", "What is 8 + 1?",
           "Subtract 3 from 10.", "What is 2 + 2?", "Add 6 and 7."]


@pytest.fixture(scope="module")
def stage2(tmp_path_factory, arith_tokenizer) -> Path:
    """A tiny random Llama (stage 1: the arith tokenizer has a MASK token) and a random K-head (stage 2)."""
    import torch

    from fluid.checkpoint import CheckpointMeta, align_special_tokens
    from fluid.khead import KHead

    root = tmp_path_factory.mktemp("serve")
    s1, s2 = root / "stage1", root / "tiny-served"
    model = tiny_model("llama", vocab_size=len(arith_tokenizer), seed=7, max_position_embeddings=2048)
    align_special_tokens(model, arith_tokenizer)
    model.save_pretrained(s1)
    arith_tokenizer.save_pretrained(s1)
    CheckpointMeta(stage=1, mask_token=arith_tokenizer.mask_token, mask_token_id=arith_tokenizer.mask_token_id,
                   horizon=16).write(s1)
    torch.manual_seed(0)
    KHead(model.config.hidden_size, 16).save(s2)
    CheckpointMeta(stage=2, stage1_checkpoint=str(s1), horizon=16).write(s2)
    return s2


class Server(ServerProcess):
    """A server with the real openai client pointed at it."""

    def __init__(self, checkpoint: Path, log: Path, *args: str):
        super().__init__(checkpoint, args, log, START_TIMEOUT_S, env={"OMP_NUM_THREADS": "1"})
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=60)
        self.model = self.client.models.list().data[0].id

    def metric(self, name: str) -> float:
        return self.metrics()[name]


@pytest.fixture(scope="module")
def server(stage2, tmp_path_factory):
    srv = Server(stage2, tmp_path_factory.mktemp("serve-log") / "server.log")
    yield srv
    srv.stop()


def chat(srv: Server, prompt: str, **kw):
    return srv.client.chat.completions.create(model=srv.model, messages=[{"role": "user", "content": prompt}], **kw)


def streamed(srv: Server, prompt: str, **kw) -> tuple[str, list]:
    chunks = list(chat(srv, prompt, stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def test_served_text_equals_streamed_generate_and_transformers(server, stage2):
    import torch
    from transformers import AutoModelForCausalLM

    from fluid.decoding.setup import build_decoder
    from fluid.generate import encode

    n = 40
    r = chat(server, PROMPTS[0], max_tokens=n)
    text = r.choices[0].message.content
    assert r.choices[0].finish_reason in ("length", "stop")
    s_text, chunks = streamed(server, PROMPTS[0], max_tokens=n)
    assert s_text == text
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2  # streamed, not one piece
    fm, dec = build_decoder(stage2, {"max_new_tokens": n}, device="cpu")
    ids = encode(fm.tokenizer, PROMPTS[0], chat=True)
    assert r.usage.prompt_tokens == len(ids)
    out = dec.generate([ids])
    assert out["texts"][0] == text
    assert r.usage.completion_tokens == len(out["tokens"][0])
    hf = AutoModelForCausalLM.from_pretrained(fm.path.parent / "stage1")
    tok = fm.tokenizer
    g = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=tok.eos_token_id,
                    pad_token_id=tok.pad_token_id)
    assert tok.decode(g[0, len(ids):], skip_special_tokens=True) == text
    # the completions endpoint on the same rendered prompt gives the same text
    c = server.client.completions.create(model=server.model, prompt=ids, max_tokens=n)
    assert c.choices[0].text == text and c.usage.prompt_tokens == len(ids)


def test_concurrent_requests_return_what_they_return_alone_and_share_forwards(server):
    alone = [chat(server, p, max_tokens=48).choices[0].message.content for p in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(lambda p: chat(server, p, max_tokens=48).choices[0].message.content, PROMPTS))
    assert together == alone
    assert server.metric("fluid_peak_active_rows") >= 2
    assert server.metric("fluid_generated_tokens_total") > 0


def test_finish_reason_and_usage_for_max_tokens_and_stop_strings(server):
    r = chat(server, PROMPTS[1], max_tokens=30)
    full = r.choices[0].message.content
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 30
    assert r.usage.total_tokens == r.usage.prompt_tokens + 30
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert stop and stop in full
    s = chat(server, PROMPTS[1], max_tokens=30, stop=[stop])
    assert s.choices[0].finish_reason == "stop"
    assert s.choices[0].message.content == full[: full.index(stop)]
    assert s.usage.completion_tokens < 30
    st_text, chunks = streamed(server, PROMPTS[1], max_tokens=30, stop=stop)
    assert st_text == full[: full.index(stop)]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]


def test_a_client_that_disconnects_mid_stream_frees_its_row(server):
    # uncancelled, this prompt runs to its max_tokens (1000), which the cancelled stream must not reach
    full = chat(server, PROMPTS[2], max_tokens=1000)
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 1000
    before = server.metric("fluid_generated_tokens_total")
    with httpx.Client(timeout=30) as h:
        with h.stream("POST", server.url + "/v1/chat/completions",
                      json={"model": server.model, "messages": [{"role": "user", "content": PROMPTS[2]}],
                            "max_tokens": 1000, "stream": True}) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if line.startswith("data: ") and '"content": "' in line and '"content": ""' not in line:
                    break  # one chunk of text, then hang up
    deadline = time.time() + 20
    while time.time() < deadline and httpx.get(server.url + "/health", timeout=5).json()["active_rows"]:
        time.sleep(0.05)
    assert httpx.get(server.url + "/health", timeout=5).json()["active_rows"] == 0
    assert server.metric("fluid_generated_tokens_total") - before < 500  # not decoded to its end
    assert chat(server, PROMPTS[3], max_tokens=5).usage.completion_tokens == 5


BAD = [  # (body or raw bytes, expected status, the field the error names)
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
    ({"model": 3, "messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ({"model": "M"}, 400, "messages"),
    ({"model": "M", "messages": []}, 400, "messages"),
    ({"model": "M", "messages": "hi"}, 400, "messages"),
    ({"model": "M", "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
    ({"model": "M", "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ({"model": "M", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages[0].content[0]"),
    ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}, 400, "max_tokens"),
    ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}, 400, "max_tokens"),
    ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10 ** 6}, 400, "max_tokens"),
    ({"model": "M", "messages": [{"role": "user", "content": "9 " * 5000}]}, 400, "messages"),
    ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.7}, 400, "temperature"),
    ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
    ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "top_p": 0.5}, 400, "top_p"),
    ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
    ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "logprobs": True}, 400, "logprobs"),
    ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400, "tools"),
    ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "stop": 7}, 400, "stop"),
    ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "stop": ["s"] * 33}, 400, "stop"),
    ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "stop": ["a", ""]}, 400, "stop"),
    (b"{" * 100_000 + b"}" * 100_000, 400, None),
    ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400, "stream"),
    ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "x": "y" * (2 << 20)}, 413, None),
]
BAD_COMPLETIONS = [
    ({"model": "M"}, 400, "prompt"),
    ({"model": "M", "prompt": ""}, 400, "prompt"),
    ({"model": "M", "prompt": [1, 10 ** 9]}, 400, "prompt"),
    ({"model": "M", "prompt": ["a", "b"]}, 400, "prompt"),
    ({"model": "M", "prompt": "hi", "echo": True}, 400, "echo"),
]


def test_bad_requests_get_a_4xx_naming_the_field_and_the_server_goes_on(server):
    def send(path, body):
        data = body if isinstance(body, bytes) else json.dumps(body).replace('"model": "M"', json.dumps(
            "model") + ": " + json.dumps(server.model)).encode()
        return httpx.post(server.url + path, content=data, headers={"content-type": "application/json"}, timeout=30)

    cases = [("/v1/chat/completions", *c) for c in BAD] + [("/v1/completions", *c) for c in BAD_COMPLETIONS]
    assert len(cases) >= 20
    for path, body, status, param in cases:
        r = send(path, body)
        assert r.status_code == status, (body if not isinstance(body, dict) else list(body), r.text[:300])
        err = r.json()["error"]
        assert err["message"] and err["param"] == param, (param, err)
        if param:
            assert param in err["message"]
    assert httpx.get(server.url + "/v1/nope", timeout=5).status_code == 404
    assert chat(server, PROMPTS[4], max_tokens=3).usage.completion_tokens == 3


def test_sigterm_finishes_or_cancels_in_flight_requests_and_exits_0(stage2, tmp_path, server):
    """The AR baseline through the same engine gives the FLUID server's text; on SIGTERM it stops
    accepting, ends its in-flight stream within the shutdown timeout and exits 0."""
    ar = Server(stage2, tmp_path / "ar.log", "decode.algorithm=ar", "shutdown_timeout_s=3")
    try:
        assert (chat(ar, PROMPTS[5], max_tokens=32).choices[0].message.content
                == chat(server, PROMPTS[5], max_tokens=32).choices[0].message.content)
        got: list = []
        ended: list = []

        def long_stream():  # long enough to be running when SIGTERM arrives (1,000 tokens, streamed)
            try:
                for c in chat(ar, PROMPTS[6], max_tokens=1000, stream=True):
                    got.append(c)
                ended.append("complete")
            except Exception as e:  # noqa: BLE001 - a stream cut at the shutdown timeout ends with an error
                ended.append(e)

        t = threading.Thread(target=long_stream)
        t.start()
        deadline = time.time() + 20
        while not got and time.time() < deadline:
            time.sleep(0.01)
        assert got and not ended  # streaming when the signal arrives
        t0 = time.time()
        ar.proc.send_signal(signal.SIGTERM)
        assert ar.proc.wait(30) == 0
        assert time.time() - t0 < 20
        t.join(30)
        assert not t.is_alive() and ended  # finished in the grace period, or cut off at its end
        with pytest.raises(httpx.HTTPError):  # and the server no longer accepts connections
            httpx.get(ar.url + "/health", timeout=2)
    finally:
        ar.stop()


@pytest.mark.slow
def test_bench_serve_drives_both_servers_to_the_same_tokens(stage2, tmp_path):
    """scripts/bench_serve.py end to end, small: every request answered, and the FLUID and AR
    servers generate the same number of tokens on the same prompts (lossless)."""
    out = tmp_path / "serve.json"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    subprocess.run([sys.executable, "scripts/bench_serve.py", "--checkpoint", str(stage2), "--prompts", str(prompts),
                    "--concurrency", "1", "3", "--requests", "3", "--rounds", "1", "--warmup", "0", "--max-tokens",
                    "24", "--out", str(out)], cwd=ROOT, check=True, timeout=300, capture_output=True,
                   env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))
    res = json.loads(out.read_text())
    assert [lv["concurrency"] for lv in res["levels"]] == [1, 3]
    for lv in res["levels"]:
        assert lv["ar"]["errors"] == lv["fluid"]["errors"] == 0
        assert lv["ar"]["requests"] == lv["fluid"]["requests"] == 3
        assert lv["ar"]["generated_tokens"] == lv["fluid"]["generated_tokens"] > 0
    assert res["levels"][1]["fluid"]["mean_rows_per_forward"] > 1  # concurrent requests shared forwards
