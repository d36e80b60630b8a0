"""``wordnet``: (words, definition) pairs from Princeton WordNet 3.0, read from Debian's ``wordnet-base``.

A second real retrieval corpus of another kind than ``codesearch``: natural-language
definitions written by WordNet's lexicographers, retrieved from the words they define.
Every synset (a set of synonyms with one meaning) of the four parts of speech gives one
pair: the *query* is its words (``"laying waste, ruin, ruining, ruination, wrecking"``,
underscores as spaces), the *document* its definition (the gloss before the first usage
example: ``"destruction achieved by causing something to be wrecked or ruined"``).
About 117,000 synsets give about 100,000 pairs once duplicates are dropped: a word list
or definition seen before (say, the second sense of ``kill``) is skipped, so that every
query has exactly one right document and no text is in both splits.

The split is by a hash of the synset (part of speech + offset): a pair goes to the test
split when the hash falls below ``test_fraction``. With the duplicates gone, the test
split shares no query text and no document text with training (words do recur: other
senses of a word can be in training, as in any dictionary).

Building (offline after one package download; nothing is fetched at run time)::

    apt-get install wordnet-base                      # files in /usr/share/wordnet
    # or, without installing (any Debian/Ubuntu machine):
    apt-get download wordnet-base && dpkg -x wordnet-base_*.deb ~/.cache/batchlab/wordnet-base

The loader looks in ``path``, ``$BATCHLAB_WORDNET``, ``/usr/share/wordnet`` and
``<cache>/wordnet-base/usr/share/wordnet``. Parsed pairs are cached as JSON under the
batchlab cache (``~/.cache/batchlab`` or ``$BATCHLAB_CACHE``), keyed by the data files'
sizes and times and the settings.

License: WordNet 3.0 license (Princeton University; permission to use, copy, modify and
distribute for any purpose without fee, keeping the copyright notice; see
``/usr/share/doc/wordnet-base/copyright``). Debian packaging: GPL-2+.

Example
-------
>>> train = load_wordnet("train")  # doctest: +SKIP
>>> train[0]  # doctest: +SKIP
('entity', 'that which is perceived or known or inferred to have its own distinct existence (living or nonliving)')
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from torch.utils.data import Dataset

from batchlab.datasets.codesearch import default_cache_dir
from batchlab.errors import BatchlabInputError

logger = logging.getLogger(__name__)

PARSE_VERSION = 1
PARTS = {"noun": "n", "verb": "v", "adj": "a", "adv": "r"}
MIN_DEFINITION_WORDS = 3
INSTALL_HINT = (
    "WordNet 3.0 is not installed: `apt-get install wordnet-base` (files in /usr/share/wordnet), or "
    "`apt-get download wordnet-base && dpkg -x wordnet-base_*.deb ~/.cache/batchlab/wordnet-base`, or pass "
    "path= / set BATCHLAB_WORDNET to a folder holding data.noun, data.verb, data.adj and data.adv"
)


@dataclass(frozen=True)
class WordNetPair:
    """One synset: ``query`` (its words), ``document`` (its definition), ``synset`` (``"n:00217773"``)."""

    query: str
    document: str
    synset: str


class WordNetPairs(Dataset):
    """A split of ``wordnet``: ``dataset[i] -> (query, document)``; parallel lists ``queries``, ``documents``, ``synsets``."""

    def __init__(self, pairs: Sequence[WordNetPair], split: str, source_hash: str) -> None:
        self.split, self.source_hash = split, source_hash
        self.queries = [p.query for p in pairs]
        self.documents = [p.document for p in pairs]
        self.synsets = [p.synset for p in pairs]

    def __len__(self) -> int:
        return len(self.queries)

    def __getitem__(self, index: int) -> tuple[str, str]:
        return self.queries[index], self.documents[index]

    def __repr__(self) -> str:
        return f"WordNetPairs(split={self.split!r}, pairs={len(self)})"


def find_wordnet(path: str | os.PathLike | None = None) -> Path:
    """The folder holding WordNet's ``data.*`` files (see the module doc for where it looks)."""
    candidates = [Path(path)] if path is not None else [
        *([Path(os.environ["BATCHLAB_WORDNET"])] if os.environ.get("BATCHLAB_WORDNET") else []),
        Path("/usr/share/wordnet"),
        default_cache_dir() / "wordnet-base" / "usr" / "share" / "wordnet",
    ]
    for folder in candidates:
        if all((folder / f"data.{part}").is_file() for part in PARTS):
            return folder
    raise BatchlabInputError(f"{INSTALL_HINT} (looked in {', '.join(str(c) for c in candidates)})")


def parse_data_line(line: str, part: str) -> WordNetPair | None:
    """One ``data.<part>`` line -> a pair (``None`` for licence lines and too-short definitions).

    >>> parse_data_line("00217773 04 n 02 laying_waste 0 ruin 0 000 | destruction achieved by ruin; \\"a ruin\\"", "n")
    WordNetPair(query='laying waste, ruin', document='destruction achieved by ruin', synset='n:00217773')
    """
    if line.startswith("  ") or "|" not in line:
        return None
    head, gloss = line.split("|", 1)
    fields = head.split()
    count = int(fields[3], 16)  # w_cnt is hexadecimal
    if len(fields) < 4 + 2 * count:  # a damaged line: skip it rather than guess
        return None
    words = []
    for i in range(count):
        word = fields[4 + 2 * i]
        if part in ("a", "s") and word.endswith(")") and "(" in word:  # adjective markers: big(a), galore(ip)
            word = word[: word.rindex("(")]
        word = word.replace("_", " ")
        if word.lower() not in (w.lower() for w in words):
            words.append(word)
    definition = gloss.split('; "', 1)[0].split(';"', 1)[0].strip().rstrip(";").strip()
    if len(definition.split()) < MIN_DEFINITION_WORDS:
        return None
    return WordNetPair(", ".join(words), definition, f"{part}:{fields[0]}")


def is_test_synset(synset: str, test_fraction: float) -> bool:
    """Deterministic split: a hash of the synset id below ``test_fraction`` means test."""
    return int.from_bytes(hashlib.sha1(synset.encode()).digest()[:8], "big") / 2**64 < test_fraction


def parse_wordnet(folder: Path) -> list[WordNetPair]:
    """Every synset's pair, duplicates (same words or same definition, case-folded) dropped, first kept."""
    pairs, seen_q, seen_d = [], set(), set()
    for name, part in PARTS.items():
        with open(folder / f"data.{name}", encoding="utf-8", errors="replace") as f:
            for line in f:
                pair = parse_data_line(line, part)
                if pair is None or pair.query.casefold() in seen_q or pair.document.casefold() in seen_d:
                    continue
                seen_q.add(pair.query.casefold())
                seen_d.add(pair.document.casefold())
                pairs.append(pair)
    return pairs


def _source_hash(folder: Path) -> str:
    digest = hashlib.sha256(f"v{PARSE_VERSION}".encode())
    for name in PARTS:
        stat = (folder / f"data.{name}").stat()
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def load_wordnet(
    split: str = "train",
    *,
    path: str | os.PathLike | None = None,
    test_fraction: float = 0.1,
    cache_dir: str | os.PathLike | None = None,
    refresh: bool = False,
) -> WordNetPairs:
    """Load a split (``"train"``, ``"test"`` or ``"all"``) of the WordNet (words, definition) pairs.

    Parameters
    ----------
    split : ``"train"``, ``"test"`` or ``"all"``.
    path : folder with WordNet's ``data.*`` files (default: see the module doc).
    test_fraction : share of synsets in the test split (default 0.1: about 10,000 pairs).
    cache_dir, refresh : the JSON cache of parsed pairs (default ``~/.cache/batchlab``); parse again.

    Raises
    ------
    BatchlabInputError : WordNet not found (with the install command), or a bad argument.
    """
    if split not in ("train", "test", "all"):
        raise BatchlabInputError(f"wordnet: split must be 'train', 'test' or 'all', got {split!r}")
    if not 0.0 < test_fraction < 1.0:
        raise BatchlabInputError(f"wordnet: test_fraction must be in (0, 1), got {test_fraction}")
    folder = find_wordnet(path)
    source_hash = _source_hash(folder)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_file = cache / f"wordnet-{source_hash}.json"
    pairs = None
    if cache_file.exists() and not refresh:
        try:
            pairs = [WordNetPair(*row) for row in json.loads(cache_file.read_text())["pairs"]]
        except (ValueError, KeyError, TypeError):
            logger.warning("wordnet: ignoring an unreadable cache file %s", cache_file)
    if pairs is None:
        pairs = parse_wordnet(folder)
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"source_hash": source_hash, "pairs": [[p.query, p.document, p.synset] for p in pairs]}))
        tmp.replace(cache_file)  # atomic: a concurrent reader never sees half a file
        logger.info("wordnet: parsed %d pairs from %s into %s", len(pairs), folder, cache_file)
    if split != "all":
        pairs = [p for p in pairs if is_test_synset(p.synset, test_fraction) == (split == "test")]
    return WordNetPairs(pairs, split, source_hash)
