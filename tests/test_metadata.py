import json

import pytest

from loom.errors import InvalidMetadata, PayloadTooLarge
from loom.metadata import parse_metadata


def test_missing_metadata_is_an_empty_object():
    """No header (or a blank one) means {}."""
    assert parse_metadata(None, 8192) == ({}, "{}")
    assert parse_metadata(b"  ", 8192) == ({}, "{}")


def test_non_ascii_metadata_round_trips_as_ascii_json():
    """UTF-8 metadata is stored as ASCII-escaped JSON that decodes to the same value."""
    value = {"name": "héllo ✓ 日本", "emoji": "🧵", "n": [1, 2.5, None, True]}
    raw = json.dumps(value, ensure_ascii=False).encode("utf-8")
    parsed, text = parse_metadata(raw, 8192)
    assert parsed == value
    assert text.isascii()
    assert json.loads(text) == value


@pytest.mark.parametrize(
    "raw",
    [b"{", b"not json", b'{"a": NaN}', b'{"a": Infinity}', b'{"a": -Infinity}',
     b'{"a": 1e400}', b"[1, 2]", b'"string"', b"42", b"\xff\xfe",
     b'{"a": ' + b"9" * 5000 + b"}", b"[" * 100000 + b"]" * 100000,
     b'{"a":' * 40 + b"1" + b"}" * 40],
)
def test_bad_metadata_is_refused_with_a_client_error(raw):
    """Invalid JSON, non-finite numbers, non-objects, bad UTF-8, huge numbers, deep nesting."""
    with pytest.raises(InvalidMetadata) as caught:
        parse_metadata(raw, 10**7)
    assert caught.value.status == 400


def test_oversized_metadata_is_413():
    """Metadata over the limit is refused with 413 before it is parsed."""
    with pytest.raises(PayloadTooLarge) as caught:
        parse_metadata(b'{"a": "' + b"x" * 9000 + b'"}', 8192)
    assert caught.value.status == 413
