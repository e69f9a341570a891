"""Label Studio's brush RLE, encoded and decoded with numpy.

The format is label-studio-sdk's (`label_studio_sdk.converter.brush`), and the tests hold this codec to it byte for
byte. The SDK builds the bit stream one character at a time in Python, which takes seconds for a ragged mask on a
large image (a mask with many runs, as any model can produce); here the runs are found, coded and packed as arrays.

Stream layout, most significant bit first: 32 bits value count, 5 bits word size - 1, four 4-bit run-length field
sizes - 1 (3, 4, 8, 16), then per run: flag 1 (a series of one value) or 0 (literal values), 2 bits choosing the
length field, the length - 1 in that field, then the 8-bit value (or each literal value); zero bits pad the end to a
whole byte (a whole zero byte when it already ends on one).
"""

from __future__ import annotations

import numpy as np

from backend.errors import RleError

LENGTH_FIELD_BITS = (3, 4, 8, 16)
LONGEST_RUN = 1 << LENGTH_FIELD_BITS[-1]  # longer runs are written as several series of this length
WORD_BITS = 8
HEADER_BITS = 32 + 5 + 4 * len(LENGTH_FIELD_BITS)


def encode_mask(mask: np.ndarray) -> list[int]:
    """RLE of an (H, W) mask as Label Studio stores a brush: RGBA, every channel 255 inside, 0 outside."""
    flat = np.asarray(mask, dtype=bool).ravel()
    # Runs of the mask, four times as long: the same stream as coding the repeated RGBA values, a quarter the work.
    lengths, run_values = _runs(flat)
    return _encode_runs(4 * flat.size, 4 * lengths, np.where(run_values, 255, 0))


def _runs(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if not values.size:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    ends = np.append(np.flatnonzero(values[1:] != values[:-1]), values.size - 1)
    return np.diff(ends, prepend=-1), values[ends].astype(np.int64)


def _encode_runs(count: int, lengths: np.ndarray, run_values: np.ndarray) -> list[int]:
    # Runs longer than a 16-bit field holds become several full-length series and a remainder, each coded alone.
    long_run = lengths > 256
    pieces = np.where(long_run, -(-lengths // LONGEST_RUN), 1)
    piece_values = np.repeat(run_values, pieces)
    piece_lengths = np.repeat(lengths, pieces)
    piece_long = np.repeat(long_run, pieces)
    index_in_run = np.arange(piece_lengths.size) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    last_piece = index_in_run == np.repeat(pieces, pieces) - 1
    piece_lengths = np.where(
        piece_long & ~last_piece, LONGEST_RUN, piece_lengths - piece_long * LONGEST_RUN * index_in_run
    )
    # Which length field each code uses: a lone value is a literal of one (field 0); a long run always field 3.
    field = np.select([piece_long, piece_lengths > 16, piece_lengths > 8], [3, 2, 1], default=0)
    field_bits = np.asarray(LENGTH_FIELD_BITS)[field]
    series = ((piece_lengths > 1) | piece_long).astype(np.int64)
    codes = (
        (series << (2 + field_bits + WORD_BITS))
        | (field << (field_bits + WORD_BITS))
        | ((piece_lengths - 1) << WORD_BITS)
        | piece_values
    )
    code_bits = 1 + 2 + field_bits + WORD_BITS

    header = [(count, 32), (WORD_BITS - 1, 5)] + [(bits - 1, 4) for bits in LENGTH_FIELD_BITS]
    stream = np.zeros(HEADER_BITS + int(code_bits.sum()), dtype=np.uint8)
    stream[:HEADER_BITS] = np.concatenate([(value >> np.arange(bits - 1, -1, -1)) & 1 for value, bits in header])
    starts = HEADER_BITS + np.cumsum(code_bits) - code_bits
    for bit in range(int(code_bits.max()) if code_bits.size else 0):
        writing = code_bits > bit
        stream[starts[writing] + bit] = (codes[writing] >> (code_bits[writing] - 1 - bit)) & 1
    # Always some zero padding, a whole byte when the stream already ends on one, as the SDK writes it.
    return np.packbits(np.concatenate([stream, np.zeros(8 - stream.size % 8, dtype=np.uint8)])).tolist()


def decode_values(rle: list[int] | bytes) -> np.ndarray:
    """The flat byte values an RLE stream holds (what the SDK's `decode_rle` returns)."""
    try:
        data = np.frombuffer(bytes(rle), dtype=np.uint8)
    except (TypeError, ValueError) as error:
        raise RleError(f"not a list of byte values: {error}") from error
    # The stream as b"0"/b"1" characters, so that int(..., 2) reads each field in C.
    bits = np.unpackbits(data).tobytes().translate(bytes.maketrans(b"\0\1", b"01"))
    if len(bits) < HEADER_BITS:
        raise RleError("the stream ends inside its header")
    count = int(bits[:32], 2)
    word_bits = int(bits[32:37], 2) + 1
    if word_bits != WORD_BITS:
        raise RleError(f"values of {word_bits} bits; a brush holds bytes")
    field_bits = [int(bits[start : start + 4], 2) + 1 for start in range(37, HEADER_BITS, 4)]
    out = np.zeros(count, dtype=np.uint8)
    position, cursor, available = 0, HEADER_BITS, len(bits)
    while position < count:
        if cursor + 3 > available:
            raise RleError("the stream ends before the values it declares")
        series = bits[cursor] == 49  # b"1"
        length_bits = field_bits[int(bits[cursor + 1 : cursor + 3], 2)]
        cursor += 3
        if cursor + length_bits > available:
            raise RleError("the stream ends inside a run length")
        end = position + 1 + int(bits[cursor : cursor + length_bits], 2)
        cursor += length_bits
        words = 1 if series else end - position
        if end > count or cursor + words * word_bits > available:
            raise RleError("a run goes past the declared value count or the end of the stream")
        if series:
            out[position:end] = int(bits[cursor : cursor + word_bits], 2)
        else:
            out[position:end] = [
                int(bits[start : start + word_bits], 2)
                for start in range(cursor, cursor + words * word_bits, word_bits)
            ]
        cursor += words * word_bits
        position = end
    return out


def decode_mask(rle: list[int] | bytes, height: int, width: int) -> np.ndarray:
    """The (H, W) bool mask of a brush RLE: where its alpha channel is set, as Label Studio draws it."""
    # The first 32 bits say how many values follow; checked first, as decoding allocates that many.
    try:
        declared = int.from_bytes(bytes(rle[:4]), "big") if len(rle) >= 4 else 0
    except (TypeError, ValueError) as error:
        raise RleError(f"not a list of byte values: {error}") from error
    if declared != height * width * 4:
        raise RleError(f"rle holds {declared} values, not {width}x{height}x4 as original_width/height say")
    return decode_values(rle).reshape(height, width, 4)[:, :, 3] > 0
