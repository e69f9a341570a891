"""The backend's brush RLE codec against label-studio-sdk's, byte for byte: generated value runs (lone values,
runs of every length field, runs past 65536) and masks; damaged streams refused with RleError. (The recorded Label
Studio traffic holds only each RLE's first bytes, so the SDK's codec is the reference here.)"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from label_studio_sdk.converter.brush import decode_rle, encode_rle, mask2rle

from backend.errors import RleError
from backend.protocol.brush_rle import _encode_runs, _runs, decode_mask, decode_values, encode_mask

# Run lengths around each length field's limits (1, 8, 16, 256, 65536) and beyond.
RUN_LENGTHS = st.sampled_from([1, 2, 7, 8, 9, 16, 17, 255, 256, 257, 4096, 65535, 65536, 65537, 140_001])
RUNS = st.lists(st.tuples(RUN_LENGTHS, st.integers(0, 255)), min_size=1, max_size=12)


def encode_values(values: np.ndarray) -> list[int]:
    """Our codec's stream for any byte values (the backend only ever writes masks, `encode_mask`), to hold it
    to the SDK's `encode_rle` on arbitrary data."""
    values = np.asarray(values).ravel()
    lengths, run_values = _runs(values)
    return _encode_runs(values.size, lengths, run_values)


def values_of(runs: list[tuple[int, int]]) -> np.ndarray:
    return np.concatenate([np.full(length, value, dtype=np.uint8) for length, value in runs])


@settings(max_examples=60, deadline=None)
@given(RUNS)
def test_value_runs_encode_and_decode_as_the_sdk_does(runs):
    values = values_of(runs)
    expected = encode_rle(values.astype(int))
    assert encode_values(values) == expected
    assert np.array_equal(decode_values(expected), decode_rle(expected))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 60), st.integers(1, 60), st.floats(0.0, 1.0), st.integers(0, 2**32 - 1))
def test_masks_encode_as_the_sdk_does_and_round_trip(height, width, density, seed):
    mask = np.random.default_rng(seed).random((height, width)) < density
    expected = mask2rle(mask.astype(np.uint8) * 255)
    assert encode_mask(mask) == expected
    assert np.array_equal(decode_mask(expected, height, width), mask)


def test_a_large_ragged_mask_and_an_empty_one_match_the_sdk():
    ragged = np.random.default_rng(0).random((300, 400)) < 0.5
    empty = np.zeros((300, 400), dtype=bool)  # one run of 480,000 values: eight 65536-value series
    for mask in (ragged, empty):
        expected = mask2rle(mask.astype(np.uint8) * 255)
        assert encode_mask(mask) == expected
        assert np.array_equal(decode_mask(expected, 300, 400), mask)


def test_damaged_streams_are_refused():
    good = encode_mask(np.eye(8, dtype=bool))
    with pytest.raises(RleError, match="not 9x8x4"):
        decode_mask(good, 8, 9)
    with pytest.raises(RleError):
        decode_values(good[:8])  # cut inside the runs
    with pytest.raises(RleError, match="header"):
        decode_values(good[:3])
    sixteen_bit_words = list(good)
    sixteen_bit_words[4] |= 0b01111000  # word size field: 16 bits
    with pytest.raises(RleError, match="bits"):
        decode_values(sixteen_bit_words)
    with pytest.raises(RleError, match="byte values"):
        decode_values([300, 1, 2])
