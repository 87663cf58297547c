"""Issue 14, item 4 for binary traces: format v2 carries the record count
and two CRC-32s (records; header + metadata). Every reader verifies them:
the whole-file reader (``trace.read`` / ``parse_binary``) and the streaming
reader (``stream.open_trace``, at the end of each pass). v1 files, which
carry no checksum, are still read. The oracle for "damaged" is the same
damage applied to a v1 file: it still parses, into a *different* trace, so
only the checksum can be what refuses the v2 file."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

import memattr
from memattr import stream
from memattr import trace as t
from memattr.trace_binary import VERSION, parse_binary

from badfiles import _binary_with_meta, flip, good_trace, meta_byte, record_byte


@pytest.fixture(scope="module")
def good():
    return good_trace()


@pytest.fixture(scope="module")
def good_bytes(good, tmp_path_factory):
    p = tmp_path_factory.mktemp("v2") / "good.trace"
    t.write(good, p)
    return p.read_bytes()


def read_whole(path):
    return t.read(path)


def read_streaming(path):
    """Every record of the file through the streaming reader, as a Trace."""
    st = stream.open_trace(path)
    chunks = [ops for _, ops in st.chunks()]
    return t.Trace(np.concatenate(chunks) if chunks else t.empty_ops(), st.meta)


READERS = {"whole": read_whole, "streaming": read_streaming}


def same(a: t.Trace, b: t.Trace) -> bool:
    return np.array_equal(a.ops, b.ops) and {k: v for k, v in a.meta.items() if k != "phases"} == {
        k: v for k, v in b.meta.items() if k != "phases"
    }


def test_written_files_are_v2_with_the_right_checksums(good, good_bytes, tmp_path):
    magic, version, rec, mlen, count, rcrc, hcrc = struct.unpack_from("<8sHHIQII", good_bytes)
    assert (magic, version, rec, count) == (b"MEMATTRT", 2, t.OP_DTYPE.itemsize, len(good)) and VERSION == 2
    # Independent of the writer: the CRCs recomputed here from the bytes.
    assert rcrc == zlib.crc32(good.ops.tobytes())
    assert hcrc == zlib.crc32(good_bytes[32 : 32 + mlen], zlib.crc32(good_bytes[:28]))
    # The streaming writer writes the same checksums.
    p = tmp_path / "streamed.trace"
    assert stream.write(stream.as_stream(good), p) == len(good)
    data = p.read_bytes()
    _, version, _, mlen, count, rcrc2, hcrc2 = struct.unpack_from("<8sHHIQII", data)
    assert version == 2 and count == len(good) and rcrc2 == rcrc
    assert hcrc2 == zlib.crc32(data[32 : 32 + mlen], zlib.crc32(data[:28]))


@pytest.mark.parametrize("reader", READERS)
def test_round_trip(good, reader, tmp_path):
    for name, write in (("whole", t.write), ("streamed", stream.write)):
        p = tmp_path / f"{name}.trace"
        write(good, p)
        assert same(READERS[reader](p), good), name


def _damaged(good, good_bytes):
    n = len(good) * t.OP_DTYPE.itemsize
    body = len(good_bytes) - n
    return {
        "record-byte": flip(good_bytes, body + record_byte(good)),
        "last-record-byte": flip(good_bytes, len(good_bytes) - 20, 0x10),
        "meta-byte": flip(good_bytes, meta_byte(good_bytes)),
        "records-crc-field": flip(good_bytes, 24),
        "header-crc-field": flip(good_bytes, 28),
        "count-field": flip(good_bytes, 16),
        "truncated": good_bytes[:-7],
        "truncated-one-record": good_bytes[: -t.OP_DTYPE.itemsize],
        "empty-records": good_bytes[:body],
    }


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize(
    "damage, says",
    [
        ("record-byte", "records checksum mismatch"),
        ("last-record-byte", "records checksum mismatch"),
        ("meta-byte", "header checksum mismatch"),
        ("records-crc-field", "header checksum mismatch"),
        ("header-crc-field", "header checksum mismatch"),
        ("count-field", "header checksum mismatch"),
        ("truncated", "file has"),
        ("truncated-one-record", "file has"),
        ("empty-records", "file has"),
    ],
)
def test_damage_is_detected_by_both_readers(good, good_bytes, reader, damage, says, tmp_path):
    p = tmp_path / f"{damage}.trace"
    p.write_bytes(_damaged(good, good_bytes)[damage])
    with pytest.raises(t.TraceFormatError, match=says) as e:
        READERS[reader](p)
    assert str(p) in str(e.value)


@pytest.mark.parametrize("damage", ["record-byte", "meta-byte"])
def test_the_same_damage_in_v1_is_a_different_valid_trace(good, damage, tmp_path):
    """The oracle: without the checksum, the damage goes unseen (so the
    v2 test above is about the checksum, not about another check)."""
    v1 = _binary_with_meta(good, __import__("json").dumps(good.meta, separators=(",", ":"), sort_keys=True).encode(), 1)
    body = len(v1) - len(good) * t.OP_DTYPE.itemsize
    bad = flip(v1, body + record_byte(good)) if damage == "record-byte" else flip(v1, meta_byte(v1))
    p = tmp_path / "v1.trace"
    p.write_bytes(bad)
    for reader in READERS.values():
        tr = reader(p)
        tr.validate()
        assert not same(tr, good)


def test_v1_files_are_still_read(good, tmp_path):
    import json

    v1 = _binary_with_meta(good, json.dumps(good.meta).encode(), 1)
    assert struct.unpack_from("<H", v1, 8)[0] == 1
    p = tmp_path / "v1.trace"
    p.write_bytes(v1)
    for reader in READERS.values():
        assert same(reader(p), good)
    assert same(parse_binary(v1), good)
    # Rewritten, it becomes v2.
    t.write(t.read(p), p)
    assert struct.unpack_from("<H", p.read_bytes(), 8)[0] == 2


def test_streaming_reader_checks_every_pass(good, good_bytes, tmp_path):
    """The stream can be replayed again (compare does, once per store):
    every pass checks the records again, so a file damaged after it was
    opened is caught by the next pass."""
    p = tmp_path / "later.trace"
    p.write_bytes(good_bytes)
    st = stream.open_trace(p)
    assert sum(ops.size for _, ops in st.chunks()) == len(good)
    p.write_bytes(_damaged(good, good_bytes)["record-byte"])
    with pytest.raises(t.TraceFormatError, match="records checksum mismatch"):
        for _ in st.chunks():
            pass
    p.write_bytes(good_bytes[:-40])
    with pytest.raises(t.TraceFormatError, match="ends early"):
        for _ in st.chunks():
            pass


def test_replay_of_a_damaged_stream_raises_before_reporting(good, good_bytes, tmp_path):
    p = tmp_path / "bad.trace"
    p.write_bytes(_damaged(good, good_bytes)["last-record-byte"])
    st = stream.open_trace(p)
    vm = memattr.Vm(st.vm_type, store="rangetree", **st.meta["vm_kwargs"])
    with pytest.raises(t.TraceFormatError, match="records checksum mismatch"):
        t.replay(st, vm)
