"""Chunked tokenisation (lminf_gguf.text) gives the ids of whole-text tokenisation, on the default model's
tokenizer, for prose, code, unicode, long lines and whitespace runs, whatever the chunk sizes."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

import lminf_gguf
from conftest import needs_default_model
from lminf_gguf.text import FileChunks, iter_token_blocks, tokenize_chunks

pytestmark = needs_default_model

PROSE = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
         "want of a wife.\n\nHowever little known the feelings or views of such a man may be on his first "
         "entering a neighbourhood, this truth is so well fixed in the minds of the surrounding families...\n") * 6
CODE = Path(lminf_gguf.__file__).with_name("text.py").read_text()[:6000]
UNICODE = ("Ça va? naïve café — «ελληνικά», русский текст, עברית, हिन्दी. 😀👍🏽🇫🇷\n"
           + "日本語のテキストです。中文没有空格的句子很长很长。" * 30 + "\n") * 3
LONG_LINE = ("word " * 5 + "12345678901234 abc, def; (x+y)*z=42 ") * 120       # no newline at all
SPACES = "a  b   c\t\td \n\n\n  x    \n\r\n   \t" * 60

TEXTS = {"prose": PROSE, "code": CODE, "unicode": UNICODE, "long_line": LONG_LINE, "spaces": SPACES}


@pytest.fixture(scope="module")
def llm():
    return lminf_gguf.LMInfinite(n_local=64, n_threads=1)


def _random_pieces(text: str, size: int, seed: int) -> list:
    rng, pieces, i = random.Random(seed), [], 0
    while i < len(text):
        n = rng.randint(1, 3 * size)
        pieces.append(text[i:i + n])
        i += n
    return pieces


@pytest.mark.parametrize("name", list(TEXTS))
@pytest.mark.parametrize("chunk_chars", [16, 200])
def test_chunked_equals_whole(llm, name, chunk_chars):
    text = TEXTS[name]
    whole = llm.tokenize(text)
    blocks = list(iter_token_blocks(llm.tokenize, _random_pieces(text, chunk_chars, chunk_chars),
                                    chunk_chars=chunk_chars, window=48))
    assert len(blocks) > 3            # it really was cut
    assert [t for b in blocks for t in b] == whole


def test_bos_only_once(llm):
    def with_bos(text, add_bos):      # a vocabulary that adds BOS (SmolLM2's does not)
        return ([1] if add_bos else []) + llm.tokenize(text, add_bos=False)

    got = tokenize_chunks(with_bos, _random_pieces(PROSE, 30, 1), chunk_chars=30, window=32)
    assert got == with_bos(PROSE, True) and got.count(1) == 1 and got[0] == 1
    assert tokenize_chunks(with_bos, [], add_bos=True) == [1]
    assert tokenize_chunks(with_bos, [PROSE], add_bos=False) == with_bos(PROSE, False)


def test_file_chunks_split_utf8_and_nll_sources(llm, tmp_path):
    path = tmp_path / "u.txt"
    path.write_text(UNICODE + PROSE, encoding="utf-8")
    chunks = FileChunks(path, chunk_bytes=7)          # cuts inside multi-byte characters
    assert "".join(chunks) == UNICODE + PROSE and chunks.fraction() == 1.0
    assert tokenize_chunks(llm.tokenize, FileChunks(path, chunk_bytes=64), chunk_chars=200, window=32) \
        == llm.tokenize(UNICODE + PROSE)

    text = PROSE[:250]
    (tmp_path / "p.txt").write_text(text)
    want = llm.nll(llm.tokenize(text))
    for source in (text, tmp_path / "p.txt", iter([text[:111], text[111:]]), np.array(llm.tokenize(text))):
        np.testing.assert_array_equal(llm.nll(source), want)
    np.testing.assert_array_equal(llm.nll(path=str(tmp_path / "p.txt")), want)
    np.testing.assert_array_equal(np.concatenate(list(llm.iter_nll(text))), want)
    # a str is always text, never a file name
    assert len(llm.nll(str(tmp_path / "p.txt"))) == len(llm.tokenize(str(tmp_path / "p.txt"))) - 1
    with pytest.raises(FileNotFoundError):
        llm.nll(tmp_path / "missing.txt")
    with pytest.raises(TypeError):
        llm.nll(3.5)
