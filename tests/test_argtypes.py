"""The CLI's argument types: values parse, bad ones become argparse errors (exit 2) that name the entry."""

import argparse

import pytest

from batchlab._argtypes import non_negative_int, positive_int, positive_int_list


def test_positive_int_list_parses_commas_and_single_values():
    assert positive_int_list("256,1024, 4096") == [256, 1024, 4096]
    assert positive_int_list("8") == [8]


@pytest.mark.parametrize("text, message", [("8,x", "got 'x'"), ("8,0", ">= 1, got 0"), (",", "got ','"),
                                           ("-3", ">= 1, got -3")])
def test_positive_int_list_names_the_bad_entry(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        positive_int_list(text)


def test_int_bounds():
    assert positive_int("1") == 1 and non_negative_int("0") == 0
    with pytest.raises(argparse.ArgumentTypeError, match=">= 0"):
        non_negative_int("-1")
