import pytest
from twisted.internet.task import Clock

from loom.errors import InvalidStreamId
from loom.ids import IdGenerator, validate_id


@pytest.mark.parametrize("good", ["a", "build-42", "A.b_c~d-e", "x" * 128, "0", "a..b"])
def test_valid_ids_are_accepted(good):
    """Ids of the allowed alphabet, 1-128 characters, not starting with a dot, pass."""
    assert validate_id(good) == good
    assert validate_id(good.encode()) == good


@pytest.mark.parametrize(
    "bad",
    ["", ".", "..", ".hidden", "a/b", "a\\b", "a\x00b", "x" * 129, "a b", "é", "a%2Fb",
     "a:b", "a?b", "\n"],
)
def test_invalid_ids_are_refused(bad):
    """Anything that could become a path, a hidden file or a weird name is refused."""
    with pytest.raises(InvalidStreamId):
        validate_id(bad)


def test_non_ascii_bytes_are_refused():
    """Bytes that are not ASCII are an invalid id, not a crash."""
    with pytest.raises(InvalidStreamId):
        validate_id(b"caf\xc3\xa9")


def test_generated_ids_are_valid_unique_and_sorted():
    """Generated ids are valid, distinct and sort by creation even within a millisecond."""
    clock = Clock()
    clock.advance(1_764_000_000.0)
    generate = IdGenerator(clock)
    ids = [generate() for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert ids == sorted(ids)
    for stream_id in ids:
        assert validate_id(stream_id) == stream_id


def test_generated_ids_never_go_backwards_with_the_clock():
    """A wall clock that steps back does not make a later id sort earlier."""
    clock = Clock()
    clock.advance(2_000_000_000.0)
    generate = IdGenerator(clock)
    first = generate()
    clock.rightNow -= 3600
    assert generate() > first
