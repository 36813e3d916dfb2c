"""Embeddings (lminf_gguf/embeddings.py): pooled hidden states against the PyTorch reference's over a stream longer
than the window, the Python API's shapes and errors, a bounded cache, and /v1/embeddings through the official
`openai` client (float and base64) on the default model."""

from __future__ import annotations

import base64
import json
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from conftest import needs_default_model, open_exact, random_tokens, rel_err
from reference import RefModel

import lminf_gguf
from lminf_gguf.embeddings import MAX_INPUTS, model_pooling, parse_request
from lminf_gguf.errors import InvalidInputError
from lminf_gguf.httpio import RequestError
from lminf_gguf.server import make_server

EXACT = 1e-4  # the suite's bound for f32 tiny models against the reference (test_attention_exact.py)
G, L = 4, 16


def hidden_states(ref, tokens) -> np.ndarray:
    """The reference's final hidden states [T, n_embd] (after the output norm) under LM-Infinite: its logits with
    the LM head replaced by the identity."""
    eye = torch.eye(ref.hp.n_embd, dtype=ref.t["token_embd.weight"].dtype)
    hidden = RefModel(ref.hp, {k: v for k, v in ref.t.items() if k != "output.bias"} | {"output.weight": eye})
    return hidden.logits(tokens, mode="lminf", n_global=G, n_local=L, dist_max=L)


@pytest.fixture(scope="module")
def tiny(tiny_model):
    path, ref = tiny_model("f32-gqa2")
    with open_exact(path, n_global=G, n_local=L, n_batch=32) as llm:
        yield llm, ref


def test_pooling_matches_reference_past_the_window(tiny):
    llm, ref = tiny
    tokens = [int(t) for t in random_tokens(150, seed=3)]  # 9 windows, 5 batches, rebases on the way
    want = hidden_states(ref, tokens)
    cells = []
    got = llm.embed(tokens, normalize=False, progress=lambda done, i: cells.append(llm.cache_info()["cells_used"]))
    assert rel_err(got, want.mean(axis=0)) <= EXACT  # the mean over every token, each seeing sinks + window
    assert rel_err(llm.embed(tokens, normalize=False, pooling="last"), want[-1]) <= EXACT
    assert rel_err(llm.embed(tokens, normalize=False, pooling="cls"), want[0]) <= EXACT
    unit = np.asarray(llm.embed(tokens))
    assert abs(np.linalg.norm(unit) - 1) < 1e-6 and rel_err(unit, want.mean(axis=0) / np.linalg.norm(
        want.mean(axis=0))) <= EXACT
    info = llm.cache_info()
    assert len(cells) == 5 and max(cells) <= info["cells_bound"] == G + L + 32
    assert info["rebases"] > 0 and info["n_tokens"] == 0  # the sequence is reset afterwards


def test_shapes_usage_and_determinism(tiny):
    llm, _ = tiny
    out = llm.create_embedding([[5, 6, 7], [8, 9]], model="m")
    assert out["object"] == "list" and out["model"] == "m"
    assert [d["index"] for d in out["data"]] == [0, 1] and all(d["object"] == "embedding" for d in out["data"])
    assert all(len(d["embedding"]) == 64 for d in out["data"])
    assert out["usage"] == {"prompt_tokens": 5, "total_tokens": 5}
    # each input is a fresh sequence: alone or in a list, the same vector; again, the same vector
    assert llm.embed([8, 9]) == out["data"][1]["embedding"] == llm.embed([[8, 9]])[0]
    assert llm.create_embedding([[5, 6, 7], [8, 9]], model="m") == out
    b64 = llm.create_embedding([5, 6, 7], encoding_format="base64")["data"][0]["embedding"]
    assert np.frombuffer(base64.b64decode(b64), dtype="<f4").tolist() == out["data"][0]["embedding"]
    assert isinstance(llm.embed([5, 6, 7])[0], float) and len(llm.embed([[5], [6], [7]])) == 3


def test_session_usable_after_embeddings(tiny):
    """Embeddings mode is off again afterwards, also when the call fails midway: a plain eval's last-row logits are
    those of the last token again (in embeddings mode llama.cpp outputs every row)."""
    llm, _ = tiny
    tokens = [int(t) for t in random_tokens(40, seed=5)]
    want = llm.logits(tokens)[-1].copy()

    class Stop(Exception):
        pass

    def stop(done, i):
        raise Stop

    with pytest.raises(Stop):
        llm.embed(tokens, progress=stop)
    assert llm.cache_info()["n_tokens"] == 0
    llm.reset()
    last = [block.copy() for block in llm.eval(tokens)][-1]
    assert rel_err(last[-1], want) < 1e-5


@pytest.mark.parametrize("bad, match", [
    ("", "'input' must be a non-empty string"),
    ([], "empty list"),
    (["a", ""], r"input\[1\] must be a non-empty string"),
    (["a", 3.5], r"input\[1\]"),
    ([[1, 2], []], r"input\[1\]"),
    ([True, 2], r"input\[0\] must be"),
    ([5, 999], "token id 999 outside the vocabulary"),
    ([[5], [6, -1]], r"input\[1\]: token id -1 outside"),
    (["x"] * (MAX_INPUTS + 1), f"at most {MAX_INPUTS} inputs"),
])
def test_bad_inputs(tiny, bad, match):
    llm, _ = tiny
    with pytest.raises(InvalidInputError, match=match):
        llm.create_embedding(bad)


def test_bad_options_and_types(tiny):
    llm, _ = tiny
    with pytest.raises(TypeError, match="'input' must be a string"):
        llm.embed({"text": "a"})
    with pytest.raises(InvalidInputError, match="pooling must be one of"):
        llm.embed([5], pooling="max")
    with pytest.raises(InvalidInputError, match="encoding_format"):
        llm.create_embedding([5], encoding_format="hex")


def test_pooling_from_metadata(tiny):
    arch = {"general.architecture": "qwen3"}
    assert model_pooling(arch) == "mean"
    assert [model_pooling({**arch, "qwen3.pooling_type": k}) for k in "0123"] == ["mean", "mean", "cls", "last"]
    with pytest.raises(InvalidInputError, match="rank"):
        model_pooling({**arch, "qwen3.pooling_type": "4"})
    llm, _ = tiny
    tokens = [5, 6, 7, 8]
    saved = llm.metadata
    try:  # a file whose metadata names last pooling: its default is the last token's state
        llm.metadata = {**saved, "llama.pooling_type": "3"}
        assert llm.embed(tokens) == llm.embed(tokens, pooling="last") != llm.embed(tokens, pooling="mean")
    finally:
        llm.metadata = saved


def test_parse_request():
    assert parse_request({"input": "a", "model": "x", "user": "u"}) == {"input": "a", "encoding_format": "float"}
    for body, param in [({"input": "a", "dimensions": 8}, "dimensions"), ({"input": "a", "suffix": "b"}, "suffix"),
                        ({"model": "x"}, "input"), ({"input": ["a", 1.5]}, "input"), ({"input": {}}, "input"),
                        ({"input": "a", "encoding_format": "hex"}, "encoding_format")]:
        with pytest.raises(RequestError) as e:
            parse_request(body)
        assert e.value.status == 400 and e.value.param == param


# -- the default model --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small():
    with lminf_gguf.LMInfinite(n_local=64, n_batch=128, n_threads=2) as llm:
        yield llm


def _cos(a, b) -> float:
    return float(np.dot(a, b))  # unit vectors


@needs_default_model
def test_similar_texts_are_closer(small):
    cat, cat2, dog, money = small.embed(["The cat sat on the mat.", "A cat was sitting on the mat.",
                                         "The dog slept on the rug.", "Quarterly revenue rose by four percent."])
    assert _cos(cat, cat2) > _cos(cat, dog) > _cos(cat, money)
    assert _cos(cat, cat2) > _cos(cat2, money)


@needs_default_model
def test_long_text_bounded(small):
    text = " ".join(f"Chapter {i}: the river bends past the old mill and the orchard." for i in range(60))
    n = len(small.tokenize(text))
    cells = []
    out = small.create_embedding(text, progress=lambda done, i: cells.append(small.cache_info()["cells_used"]))
    info = small.cache_info()
    assert n > 8 * 64 and out["usage"]["prompt_tokens"] == n and len(out["data"][0]["embedding"]) == 576
    assert max(cells) <= info["cells_bound"] == 10 + 64 + 128 and info["rebases"] > 0


# -- the server, with the official client -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(small):
    server = make_server(small, "127.0.0.1", 0, model_id="smol")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server.url
    server.shutdown()
    server.server_close()
    thread.join(5)


def _post(url, body):
    req = urllib.request.Request(url + "/v1/embeddings", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@needs_default_model
def test_openai_client_embeddings(served):
    openai = pytest.importorskip("openai", reason="the openai client is a test extra")
    client = openai.OpenAI(base_url=served + "/v1", api_key="unused", max_retries=0, timeout=120)
    texts = ["The cat sat on the mat.", "Quarterly revenue rose by four percent."]
    floats = client.embeddings.create(model="smol", input=texts, encoding_format="float")
    packed = client.embeddings.create(model="smol", input=texts)  # the client asks for base64 and decodes it
    assert [d.index for d in floats.data] == [0, 1] and floats.model == "smol"
    assert [d.embedding for d in packed.data] == [d.embedding for d in floats.data]
    assert len(floats.data[0].embedding) == 576 and floats.usage.prompt_tokens == floats.usage.total_tokens > 10
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="smol", input="a", dimensions=64)
    assert e.value.response.json()["error"]["param"] == "dimensions"
    status, raw = _post(served, {"input": texts[0], "encoding_format": "base64"})
    assert status == 200 and np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), "<f4").tolist() == \
        floats.data[0].embedding
    status, ids = _post(served, {"input": [[1, 2, 3], [4, 5]]})
    assert status == 200 and len(ids["data"]) == 2 and ids["usage"]["prompt_tokens"] == 5


@needs_default_model
@pytest.mark.parametrize("body, param", [({"input": ""}, "input"), ({"input": [[1, 2], "a", 3.0]}, "input"),
                                         ({"input": "a", "dimensions": 3}, "dimensions"),
                                         ({"input": [1, 10 ** 9]}, None)])
def test_server_refusals(served, body, param):
    status, err = _post(served, body)
    assert status == 400 and err["error"]["param"] == param, err


@needs_default_model
def test_langchain_openai_embeddings(served):
    lc = pytest.importorskip("langchain_openai", reason="langchain-openai is a test extra")
    # its default tokenises with tiktoken (OpenAI's vocabulary, fetched from the network) and sends those ids
    emb = lc.OpenAIEmbeddings(base_url=served + "/v1", api_key="unused", model="smol",
                              check_embedding_ctx_length=False)
    docs = emb.embed_documents(["The cat sat on the mat.", "Quarterly revenue rose by four percent."])
    assert len(docs) == 2 and len(docs[0]) == 576
    assert emb.embed_query("The cat sat on the mat.") == pytest.approx(docs[0], abs=1e-6)
