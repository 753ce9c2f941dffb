"""A compact set of 64-bit row fingerprints, each with the line it was first seen on. Torch-free, stdlib only.

Duplicate detection of an upload of millions of rows must not cost a Python object per row (a `dict[int, int]`
costs about 120 bytes a row). This keeps `ROW_BYTES` per distinct row, plus what `array` over-allocates and a
bucket's own few dozen bytes: the fingerprint as an unsigned 64-bit integer and its line as an unsigned 32-bit one
(all lines widen to 64 bits if a line number ever needs it: a file of more than 4 GiB).

Fingerprints are spread over buckets by their top bits and kept sorted within each, so that a look-up is a binary
search and an insertion moves a few kB, both in C. When one bucket grows past `BUCKET_MAX`, every bucket is cut in
two at its next bit (two slices, one bucket at a time, so memory never doubles): buckets stay small at any row count,
and their own cost (two `array` objects each) stays near 2% of what they hold.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left

ROW_BYTES = 12  # a fingerprint (8) and its line (4); README and bench/upload_memory.py quote it
FIRST_BITS = 4  # 16 buckets to begin with: a small file costs next to nothing
BUCKET_MAX = 1024  # a bucket past this many and all are cut in two: ~500 on average, so an insertion moves a few kB
NARROW_LINE = 0xFFFFFFFF


class Fingerprints:
    """`first_line(fingerprint, line)`: the line a fingerprint was first seen on, or None (and it is kept)."""

    def __init__(self) -> None:
        self._shift = 64 - FIRST_BITS
        self._line_type = "I"
        self._keys = [array("Q") for _ in range(1 << FIRST_BITS)]
        self._lines = [array(self._line_type) for _ in range(1 << FIRST_BITS)]

    def first_line(self, fingerprint: int, line: int) -> int | None:
        bucket = fingerprint >> self._shift
        keys = self._keys[bucket]
        at = bisect_left(keys, fingerprint)
        if at < len(keys) and keys[at] == fingerprint:
            return self._lines[bucket][at]
        if line > NARROW_LINE and self._line_type == "I":
            self._widen()
        keys.insert(at, fingerprint)
        self._lines[bucket].insert(at, line)
        if len(keys) > BUCKET_MAX:
            self._split()
        return None

    def _split(self) -> None:
        """Twice the buckets: each cut in two where its next bit turns to 1."""
        old_keys, old_lines = self._keys, self._lines
        self._keys, self._lines = [], []
        self._shift -= 1
        for bucket in range(len(old_keys)):
            keys, lines = old_keys[bucket], old_lines[bucket]
            old_keys[bucket] = old_lines[bucket] = None  # freed once cut: memory grows by one bucket at most
            cut = bisect_left(keys, (2 * bucket + 1) << self._shift)
            self._keys += (keys[:cut], keys[cut:])
            self._lines += (lines[:cut], lines[cut:])

    def _widen(self) -> None:
        """Line numbers past 2**32 (a file of more than 4 GiB): 8 bytes a line from here on."""
        self._line_type = "Q"
        self._lines = [array("Q", a) for a in self._lines]
