"""Embeddings: one vector per input from the model's hidden states (OpenAI's /v1/embeddings, llama-cpp-python's
create_embedding / embed), over the bounded LM-Infinite cache.

How: llama_set_embeddings(ctx, True) makes llama_decode output every token's final hidden state (after the output
norm, before the LM head: llama.cpp's embeddings of a generative model). Contexts are created with pooling NONE
(context.py), so the states come per token; they are pooled here with a running sum, one batch at a time, so an
input of any length takes one vector of memory and the cache stays bounded. The sequence is reset before and after
each input (a chat held by the session is dropped) and embeddings mode is switched off again, also on errors.

Pooling: the GGUF key `<arch>.pooling_type` where the file has one (1 mean, 2 cls: the first token's state, 3 last:
the last token's), else mean; 0 (none: a vector per token, which has no OpenAI shape) is taken as mean and 4 (rank:
a reranker's score head, not a hidden state) is refused unless a pooling is asked for. Vectors are L2-normalised
(unit length, as OpenAI's and llama-server's are: cosine similarity is a dot product); embed(normalize=False) gives
the raw pooled state. Text is tokenised as for generation (the vocabulary's BOS/EOS added); token ids are taken as
given.

A text longer than the window: every token's hidden state is the one LM-Infinite computes in the stream, attending
to the sinks (the first n_global tokens) and to the n_local tokens before it; mean pooling averages them over all the
tokens, so the vector sums up the whole text with each part seen in its local context (no token sees it all), and
last pooling is the state of its end (window + sinks). In lminf-topk mode only the last row of each ubatch also
attends to the top-k middle tokens, as in prompt evaluation; in vanilla mode an input longer than n_ctx is a
ContextFullError.
"""

from __future__ import annotations

import base64
from typing import Callable, List, Optional, Union

import numpy as np

from . import inputs
from ._lib import llama_raw
from .context import in_use
from .errors import InvalidInputError, InvalidTypeError
from .httpio import RequestError

__all__ = ["Embeddings", "MAX_INPUTS", "POOLINGS", "model_pooling", "parse_request"]

MAX_INPUTS = 2048  # inputs per call (OpenAI's own limit per request)
POOLINGS = ("mean", "cls", "last")
_GGUF_POOLING = {0: "mean", 1: "mean", 2: "cls", 3: "last"}  # llama_pooling_type; 4 (rank) has no hidden state
ENCODINGS = ("float", "base64")
FIELDS = {"input", "model", "encoding_format", "dimensions", "user"}  # model, user: accepted and ignored

Input = Union[str, List[int], List[str], List[List[int]]]


def model_pooling(metadata: dict) -> str:
    """The pooling named by the GGUF metadata (`<arch>.pooling_type`), "mean" where it names none."""
    arch = metadata.get("general.architecture", "")
    raw = metadata.get(f"{arch}.pooling_type")
    try:
        kind = int(raw) if raw is not None else 1
    except ValueError:
        kind = 1
    if kind == 4:
        raise InvalidInputError("this model's pooling is 'rank' (a reranker: its head scores a pair, it does not "
                                f"embed); pass pooling= one of {', '.join(POOLINGS)} for its hidden states")
    return _GGUF_POOLING.get(kind, "mean")


def _is_id(t) -> bool:
    return isinstance(t, (int, np.integer)) and not isinstance(t, bool)


def split_inputs(input: Input, n_vocab: Optional[int]) -> list:
    """OpenAI's input forms as a list of inputs, a str or a list of ids each (checked against the vocabulary unless
    n_vocab is None: the shape alone); InvalidInputError otherwise."""
    if isinstance(input, str):
        items = [input]
    elif isinstance(input, (list, tuple)):
        if not input:
            raise InvalidInputError("'input' is an empty list")
        items = [list(input)] if all(_is_id(t) for t in input) else list(input)
    else:
        raise InvalidTypeError("'input' must be a string, a list of token ids, or a list of strings or of lists of "
                               f"token ids, not {type(input).__name__}")
    if len(items) > MAX_INPUTS:
        raise InvalidInputError(f"at most {MAX_INPUTS} inputs per call, not {len(items)}")
    where = (lambda i: "'input'") if len(items) == 1 else (lambda i: f"input[{i}]")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str) and item:
            out.append(item)
        elif isinstance(item, (list, tuple)) and item and all(_is_id(t) for t in item):
            try:
                out.append(list(item) if n_vocab is None else inputs.token_ids(n_vocab, item))
            except InvalidInputError as e:
                raise InvalidInputError(f"{where(i)}: {e}") from None
        else:
            raise InvalidInputError(f"{where(i)} must be a non-empty string or a non-empty list of token ids")
    return out


class _Pool:
    """A running pooling of per-token states [n, n_embd], batch by batch (float64 sum for the mean)."""

    def __init__(self, kind: str, n_embd: int):
        self.kind, self.n = kind, 0
        self.acc = np.zeros(n_embd, dtype=np.float64)

    def add(self, rows: np.ndarray) -> None:
        if self.kind == "mean":
            self.acc += rows.sum(axis=0, dtype=np.float64)
        elif self.kind == "last" or self.n == 0:  # cls keeps the first row
            self.acc = rows[-1 if self.kind == "last" else 0].astype(np.float64)
        self.n += len(rows)

    def vector(self, normalize: bool) -> np.ndarray:
        v = self.acc / self.n if self.kind == "mean" else self.acc
        norm = np.linalg.norm(v)
        return (v / norm if normalize and norm > 0 else v).astype(np.float32)


def embed_inputs(llm, items: list, pooling: str, normalize: bool, progress) -> tuple:
    """(one float32 vector per input, tokens evaluated) for checked inputs (split_inputs), each a fresh sequence."""
    if pooling not in POOLINGS:
        raise InvalidInputError(f"pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")
    if llama_raw.llama_pooling_type(llm.ctx) != llama_raw.LLAMA_POOLING_TYPE_NONE:
        # a context that pools in its graph pools each ubatch apart and leaves the per-token rows unset
        raise RuntimeError("the context pools in llama.cpp (pooling type not NONE): no per-token hidden states")
    n_embd = int(llama_raw.llama_model_n_embd_out(llm.model.llama_model))
    vectors, n_tokens = [], 0
    llm.reset()
    llama_raw.llama_set_embeddings(llm.ctx, True)
    try:
        for i, item in enumerate(items):
            llm.reset()
            pool = _Pool(pooling, n_embd)
            blocks = inputs.token_blocks(llm, item, None, True)[0] if isinstance(item, str) else [item]
            for batch in inputs.batches(blocks, llm.n_batch):
                for _ in llm.eval(batch, all_logits=True):  # embeddings mode outputs every row anyway
                    ptr = llama_raw.llama_get_embeddings(llm.ctx)
                    if not ptr:
                        raise RuntimeError("llama.cpp returned no embeddings")
                    pool.add(np.ctypeslib.as_array(ptr, shape=(len(batch), n_embd)))
                n_tokens += len(batch)
                if progress:
                    progress(n_tokens, i)
            vectors.append(pool.vector(normalize))
    finally:
        llama_raw.llama_set_embeddings(llm.ctx, False)
        llm.reset()
    return vectors, n_tokens


def encode(vector: np.ndarray, encoding_format: str):
    """A vector as OpenAI sends it: a list of floats, or base64 of its little-endian float32 bytes."""
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector.astype(np.float32).tolist()


class Embeddings:
    """LMInfinite's embedding methods (a mixin of engine.LMInfinite, as responses.OpenAIStyle)."""

    @in_use
    def create_embedding(self, input: Input, model: Optional[str] = None, *, encoding_format: str = "float",
                         pooling: Optional[str] = None,
                         progress: Optional[Callable[[int, int], None]] = None) -> dict:
        """OpenAI's (and llama-cpp-python's) embedding response for input: a string, a list of token ids, or a list
        of strings or of lists of ids (at most MAX_INPUTS), any length each. L2-normalised vectors; pooling None:
        the model's (module docstring); encoding_format "float" or "base64". progress(tokens_done, input_index) is
        called after each batch (raise from it to stop)."""
        if encoding_format not in ENCODINGS:
            raise InvalidInputError(f"encoding_format must be one of {', '.join(ENCODINGS)}, not {encoding_format!r}")
        items = split_inputs(input, self.n_vocab)
        vectors, n = embed_inputs(self, items, pooling or model_pooling(self.metadata), True, progress)
        return {"object": "list",
                "data": [{"object": "embedding", "index": i, "embedding": encode(v, encoding_format)}
                         for i, v in enumerate(vectors)],
                "model": model if model is not None else self.model_path,
                "usage": {"prompt_tokens": n, "total_tokens": n}}

    @in_use
    def embed(self, input: Input, normalize: bool = True, *, pooling: Optional[str] = None,
              progress: Optional[Callable[[int, int], None]] = None) -> Union[List[float], List[List[float]]]:
        """The vector of a string or of one list of token ids (a list of floats), or the vectors of a list of inputs
        (a list of lists), as llama-cpp-python's Llama.embed; normalize=False: the raw pooled hidden state."""
        items = split_inputs(input, self.n_vocab)
        vectors, _ = embed_inputs(self, items, pooling or model_pooling(self.metadata), normalize, progress)
        one = isinstance(input, str) or all(_is_id(t) for t in input)
        lists = [v.tolist() for v in vectors]
        return lists[0] if one else lists


def parse_request(body: dict) -> dict:
    """create_embedding keywords for a /v1/embeddings body; RequestError (400, naming the field) otherwise."""
    unknown = sorted(k for k in body if k not in FIELDS)
    if unknown:
        raise RequestError(400, f"unsupported field {unknown[0]!r}; /v1/embeddings implements: "
                           + ", ".join(sorted(FIELDS)), unknown[0])
    if body.get("dimensions") is not None:
        raise RequestError(400, "'dimensions' is not supported: the vectors have the model's hidden size (they are "
                           "pooled hidden states, not a model trained to be shortened)", "dimensions")
    if "input" not in body:
        raise RequestError(400, "missing required field 'input'", "input")
    fmt = body.get("encoding_format")
    if fmt is not None and fmt not in ENCODINGS:
        raise RequestError(400, f"'encoding_format' must be one of {', '.join(ENCODINGS)}", "encoding_format")
    try:  # the shape here, for a 400 naming the field; ids outside the vocabulary are the session's check
        split_inputs(body["input"], None)
    except (InvalidInputError, InvalidTypeError) as e:
        raise RequestError(400, str(e), "input") from None
    return {"input": body["input"], "encoding_format": fmt or "float"}
