"""The wordnet dataset: parsing WordNet's data files, duplicates, the split, the missing-data error.

The files here are tiny hand-written ones in WordNet 3.0's ``data.<pos>`` format (the real
ones come from Debian's wordnet-base, which CI does not install).
"""

from __future__ import annotations

import pytest

from batchlab.datasets.wordnet import find_wordnet, is_test_synset, load_wordnet, parse_data_line
from batchlab.errors import BatchlabInputError

LICENCE = "  1 This software and database is being provided to you, the LICENSEE, by  \n"
LINES = {
    "noun": [
        "00217773 04 n 05 laying_waste 0 ruin 0 ruining 0 ruination 0 wrecking 0 000 | destruction achieved by causing "
        "something to be wrecked or ruined  ",
        "00217593 04 n 01 kill 1 002 @ 00217014 n 0000 | the destruction of an enemy plane or ship; \"the pilot reported "
        "two kills\"  ",
        "00217600 04 n 01 kill 2 000 | the destruction of an enemy plane or ship  ",  # same definition: dropped
        "00217601 04 n 01 Kill 3 000 | an animal killed by a predator for food  ",  # same words (case-folded): dropped
        "00217602 04 n 01 x 0 000 | too short  ",  # definition under 3 words: dropped
    ],
    "verb": ["00100905 29 v 01 warm_up 1 000 | cause to do preliminary exercises; \"The coach warmed up the players\"  "],
    "adj": ["00001740 00 a 01 able 0 000 | (usually followed by `to') having the necessary means  ",
            "01382086 00 s 02 big(a) 0 large 0 000 | above average in size or number or quantity  "],
    "adv": ["00001740 02 r 01 a_cappella 0 000 | without musical accompaniment; \"they performed a cappella\"  "],
}


@pytest.fixture
def wordnet_dir(tmp_path):
    folder = tmp_path / "wordnet"
    folder.mkdir()
    for part, lines in LINES.items():
        (folder / f"data.{part}").write_text(LICENCE + "\n".join(lines) + "\n")
    return folder


def test_parse_line_words_definition_and_markers():
    pair = parse_data_line(LINES["adj"][1], "a")
    assert pair.query == "big, large" and pair.document == "above average in size or number or quantity"
    assert parse_data_line(LICENCE, "n") is None
    assert parse_data_line(LINES["noun"][4], "n") is None
    verb = parse_data_line(LINES["verb"][0], "v")
    assert verb.query == "warm up" and verb.document == "cause to do preliminary exercises" and verb.synset == "v:00100905"


def test_load_drops_duplicates_and_splits_without_shared_texts(wordnet_dir, tmp_path):
    everything = load_wordnet("all", path=wordnet_dir, cache_dir=tmp_path / "cache")
    assert everything.queries == ["laying waste, ruin, ruining, ruination, wrecking", "kill", "warm up", "able", "big, large",
                                  "a cappella"]
    assert everything.documents[1] == "the destruction of an enemy plane or ship"
    train = load_wordnet("train", path=wordnet_dir, cache_dir=tmp_path / "cache", test_fraction=0.5)
    test = load_wordnet("test", path=wordnet_dir, cache_dir=tmp_path / "cache", test_fraction=0.5)
    assert len(train) + len(test) == len(everything)
    assert not set(train.queries) & set(test.queries) and not set(train.documents) & set(test.documents)
    assert all(is_test_synset(s, 0.5) for s in test.synsets)
    assert list((tmp_path / "cache").glob("wordnet-*.json"))  # parsed once, then read from the cache
    assert load_wordnet("all", path=wordnet_dir, cache_dir=tmp_path / "cache").queries == everything.queries


def test_missing_wordnet_says_how_to_install(tmp_path):
    with pytest.raises(BatchlabInputError, match="apt-get install wordnet-base"):
        find_wordnet(tmp_path)
    with pytest.raises(BatchlabInputError, match="split must be"):
        load_wordnet("dev", path=tmp_path)
