"""User ids: the grammar every id must match, and the compact key encoding.

An id is a string of 1 to 64 characters from ``[A-Za-z0-9_.:-]``: plain integers
(``123``), names (``alice``) and typed resources (``user:123``) all qualify, and
ids always come back from cometd as strings.

Integer ids are the bulk of real data, so an id that is the canonical decimal
form of an integer below 2**32 (no sign, no leading zero) is stored as four
bytes; any other id is stored as its ASCII text. ``"007"`` is therefore a name,
not the integer 7, and round-trips unchanged.
"""

from __future__ import annotations

import re

__all__ = [
    "ID_PATTERN", "MAX_INT_ID", "InvalidId", "check_id", "int_value", "encode_key", "decode_key",
]

MAX_INT_ID = 2**32 - 1
#: the id grammar as a regular expression, for parsers that match ids in place
ID_PATTERN = r"[A-Za-z0-9_.:-]{1,64}"
_ID = re.compile(ID_PATTERN + r"\Z")
_CANONICAL_INT = re.compile(r"(0|[1-9][0-9]{0,9})\Z")

# Key tags: integer ids sort numerically (big-endian) and before all names.
_INT_TAG = b"\x01"
_NAME_TAG = b"\x02"


class InvalidId(ValueError):
    """An id that does not match the id grammar."""

    def __init__(self, value: object) -> None:
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        super().__init__(
            f"invalid id {shown}: ids are 1-64 characters from A-Z a-z 0-9 _ . : -"
        )
        self.value = value


def check_id(value: str | int) -> str:
    """Return *value* as a validated id string, or raise :class:`InvalidId`."""
    if isinstance(value, bool):
        raise InvalidId(value)
    if isinstance(value, int):
        if value < 0:
            raise InvalidId(value)
        value = str(value)
    if not isinstance(value, str) or not _ID.match(value):
        raise InvalidId(value)
    return value


def int_value(user: str) -> int | None:
    """The integer an id stands for when it is stored compactly, else None."""
    if _CANONICAL_INT.match(user):
        number = int(user)
        if number <= MAX_INT_ID:
            return number
    return None


def encode_key(user: str) -> bytes:
    """The key bytes of an already validated id."""
    number = int_value(user)
    if number is not None:
        return _INT_TAG + number.to_bytes(4, "big")
    return _NAME_TAG + user.encode("ascii")


def decode_key(key: bytes) -> str:
    """The id that :func:`encode_key` turned into *key*."""
    if key[:1] == _INT_TAG:
        return str(int.from_bytes(key[1:5], "big"))
    return key[1:].decode("ascii")
