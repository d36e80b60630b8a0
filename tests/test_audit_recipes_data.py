"""Audit of `--data` files (batchlab.recipes.pairs.read_pairs): odd but valid content reads as written
(byte-order mark, CRLF, quoted line breaks, unicode, extra named columns), and odd invalid content is
refused with the line and the fix, never read silently into other texts."""

from __future__ import annotations

import pytest

from batchlab.errors import BatchlabInputError
from batchlab.recipes.pairs import read_pairs


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))  # bytes as given: no newline translation
    return path


EXPECTED = (["a", "c"], ["b", "d"])


@pytest.mark.parametrize("name,text", [
    ("bom.jsonl", '\ufeff{"query": "a", "document": "b"}\r\n{"query": "c", "document": "d"}\r\n'),
    ("bom.csv", "\ufeffquery,document\r\na,b\r\nc,d\r\n"),
    ("bom.tsv", "\ufeffa\tb\nc\td\n"),  # the mark used to stay in the first query
    ("crlf.tsv", "a\tb\r\n\r\nc\td\r\n"),
    ("extra.csv", "id,query,document,source\n1,a,b,x\n2,c,d,y\n"),  # named extra columns are ignored
    ("extra.jsonl", '{"query": "a", "document": "b", "id": 1}\n{"anchor": "c", "positive": "d"}\n'),
])
def test_valid_odd_files_read_as_written(tmp_path, name, text):
    pairs = read_pairs(_write(tmp_path, name, text))
    assert (pairs.queries, pairs.documents) == EXPECTED and pairs.labels is None


def test_quoted_line_breaks_and_unicode_are_kept(tmp_path):
    text = 'query,document,label\r\n"sort a list,\r\nthen print","def f(x):\r\n    return sorted(x)",1\r\nähnlich 日本,d,2\r\n'
    pairs = read_pairs(_write(tmp_path, "p.csv", text))
    assert pairs.queries == ["sort a list,\nthen print", "ähnlich 日本"]  # the line break was dropped before
    assert pairs.documents == ["def f(x):\n    return sorted(x)", "d"] and pairs.labels == ["1", "2"]


@pytest.mark.parametrize("name,text,match", [
    ("comma.csv", "query,document\na,b\nsort, then print,d\n", r"line 3: 3 cells but the header names 2; quote"),
    ("short.csv", "query,document\na\n", r"line 2: 1 cell\(s\) but the header names 2 \(no 'document'\)"),
    ("list.jsonl", '{"query": "a", "document": "b", "label": [1]}\n', r"pair 1: a label must be a string or a number"),
    ("dict.jsonl", '{"query": "a", "document": "b", "label": {"x": 1}}\n', r"a label must be a string or a number"),
    ("header.csv", "query,document\n", "holds no pairs"),
    ("empty.jsonl", "", "holds no pairs"),
    ("blank.tsv", "\r\n\r\n", "holds no pairs"),
    ("names.csv", "question,answer\na,b\n", r"no 'query' or 'anchor' field \(got \['answer', 'question'\]\)"),
    ("some.jsonl", '{"query": "a", "document": "b", "label": 1}\n{"query": "c", "document": "d"}\n',
     "1 of 2 pairs have a label"),
    ("four.tsv", "a\tb\tc\td\n", "line 1: expected query<TAB>document"),
    ("latin1.tsv", None, "not UTF-8"),
    ("pairs.txt", "a\tb\n", "unknown format; use .jsonl, .tsv or .csv"),
])
def test_invalid_files_are_refused_with_the_line_and_the_fix(tmp_path, name, text, match):
    if text is None:
        path = tmp_path / name
        path.write_bytes("caf\u00e9\tb\n".encode("latin-1"))
    else:
        path = _write(tmp_path, name, text)
    with pytest.raises(BatchlabInputError, match=match):
        read_pairs(path)
