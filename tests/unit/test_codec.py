"""The stored customer value: ids as 64-bit digests, day-resolution order times, MessagePack
(format 4), and formats 1-3 still read (and 2-3 still written when asked)."""

from __future__ import annotations

import base64
import hashlib

import msgpack
import orjson
import pytest

from state.codec import StoredCustomer, decode, encode
from state.rfm import Limits, StateEvent, Window, apply_event, frequency_monetary, id_text

DAY = 86_400_000
E1 = "0b7e6a2c-5f1d-4c9a-9f7e-2d3b1a0c9e8f"  # UUID event ids and order ids (36 characters)
E2 = "7f3c1b9e-2a4d-4e8f-b6c5-1d0e9f8a7b6c"
O1 = "a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d"
TEXT = Limits(text_ids=True)


def blake(value: str) -> bytes:
    """The oracle: BLAKE2b with a 9-byte digest, first 8 bytes (the docstring's definition)."""
    return hashlib.blake2b(value.encode(), digest_size=9).digest()[:8]


def blake_text(value: str) -> str:
    return "#" + base64.urlsafe_b64encode(hashlib.blake2b(value.encode(), digest_size=9)
                                          .digest()).decode()


def test_ids_are_remembered_as_64_bit_digests_and_still_deduplicate():
    t = 20_000 * DAY + 5 * 3_600_000  # day 20000, 05:00 UTC
    s, ok1 = apply_event(None, StateEvent(E1, O1, "purchase", 1000, t))
    s, ok2 = apply_event(s, StateEvent(E1, O1, "purchase", 1000, t))  # published twice
    s, ok3 = apply_event(s, StateEvent(E2, O1, "refund", 1000, t + DAY))  # all of O1 back
    assert (ok1, ok2, ok3) == (True, False, True)
    assert (s.frequency, s.monetary_minor) == (0, 0)  # the refund found the order by digest
    assert s.recent_event_ids == (blake(E2), blake(E1))
    assert s.orders[0].order_id == blake(O1) and s.orders[0].first_day == 20_000


def test_text_ids_of_formats_2_3_keep_short_ids_and_never_collide_with_them():
    assert id_text("#abc") == blake_text("#abc") and id_text("o1") == "o1"
    assert id_text("x" * 13) == "x" * 13 and id_text("x" * 14) == blake_text("x" * 14)
    s, _ = apply_event(None, StateEvent(E1, "o1", "purchase", 1000, 0), TEXT)
    assert s.recent_event_ids == (blake_text(E1),) and s.orders[0].order_id == "o1"
    # a customer's ids keep their form, whatever the limits ask for new customers
    s2, again = apply_event(s, StateEvent(E1, "o1", "purchase", 1000, 0))
    s3, _ = apply_event(s, StateEvent(E2, "o1", "refund", 1000, 0))
    assert (s2, again) == (s, False) and s3.recent_event_ids == (blake_text(E2), blake_text(E1))
    assert s3.frequency == 0  # the refund found "o1" in text form
    d, _ = apply_event(None, StateEvent(E1, "o1", "purchase", 1000, 0))
    d2, again = apply_event(d, StateEvent(E1, "o1", "purchase", 1000, 0), TEXT)
    assert again is False and d2.recent_event_ids == (blake(E1),)


def test_format_4_layout_as_documented():
    t1, t2 = 20_000 * DAY, 20_003 * DAY + 7
    s, _ = apply_event(None, StateEvent("e1", "o1", "purchase", 1000, t1))
    s, _ = apply_event(s, StateEvent("e2", "o2", "purchase", 2000, t2))
    s, _ = apply_event(s, StateEvent("e3", "o2", "refund", 500, t2))
    c = StoredCustomer("c1", s, "Champions", 3, (5, 4, 1), t2, None)
    by_hand = [4, "Champions", 3, 2, 3000, 500, t2, t1, blake("e3") + blake("e2") + blake("e1"),
               [blake("o2") + blake("o1"), [2000, 1000], [500, 0], [20_003, 20_000]], [], 541,
               t2, None]
    assert msgpack.unpackb(encode(c), raw=True) == [
        x.encode() if isinstance(x, str) else x for x in by_hand]
    assert decode("c1", msgpack.packb(by_hand, use_bin_type=False)) == c
    assert decode("c1", encode(c)) == c
    # a worker writing format 3 reads it as it is, and writes it back in format 4 (the
    # digests have no text form; a release of format 3 could not read it anyway)
    assert decode("c1", encode(c), text_ids=True) == c
    assert encode(c, 3) == encode(c) and encode(c, 2) == encode(c)


def test_format_4_is_smaller_than_format_3_by_the_digests_and_order_columns():
    # 8 orders, one event each, ids as bench/redis_memory.py's ("pos-<n>", "pos-<n>-1"): per
    # event a 13 B string -> 8 B of digest; per order an array [11 B id, 3 B, 1 B, 1 B] (17 B
    # with its header) -> 13 B of columns; headers: 2 arrays (2 B) -> raw16 strings (two of
    # 3 B: MessagePack's old spec, which cmsgpack reads, has no str8), 4 arrays (4 B):
    # 8 * (5 + 4) - (10 - 2) = 64 B less
    text = digests = None
    for n in range(8):
        e = StateEvent(f"pos-{100_000 + n}-1", f"pos-{100_000 + n}", "purchase", 1000, n * DAY)
        text, _ = apply_event(text, e, TEXT)
        digests, _ = apply_event(digests, e)
    v3 = encode(StoredCustomer("c1", text, "Champions", 3, (5, 4, 1), 0, None), 3)
    v4 = encode(StoredCustomer("c1", digests, "Champions", 3, (5, 4, 1), 0, None))
    assert len(v3) - len(v4) == 64


def test_format_1_values_are_read_converted_and_rewritten_as_format_4():
    t = 20_000 * DAY + 5 * 3_600_000
    v1 = orjson.dumps([1, "New Customers", None, 1, 1000, 0, t, t, [E1], [[O1, 1000, 0, t]],
                       [], 555, t, None])
    c = decode("c1", v1)
    assert c is not None and c.scores == (5, 5, 5) and c.segment == "New Customers"
    s, again = apply_event(c.state, StateEvent(E1, O1, "purchase", 1000, t))
    assert again is False  # the event stored in format 1 is recognised
    s, ok = apply_event(s, StateEvent(E2, O1, "refund", 1000, t + DAY))
    assert ok and s.frequency == 0  # and so is the order
    stored = msgpack.unpackb(encode(c), raw=True)
    assert stored[0] == 4 and stored[8] == blake(E1)
    assert stored[9] == [blake(O1), [1000], [0], [20_000]]
    assert decode("c1", encode(c)) == c
    text = decode("c1", v1, text_ids=True)  # for a worker writing format 3
    assert text is not None and text.state.recent_event_ids == (blake_text(E1),)


@pytest.mark.parametrize("fmt", [2, 3])
def test_formats_2_and_3_read_as_the_same_customer_with_ids_converted(fmt):
    t = 20_000 * DAY
    s, _ = apply_event(None, StateEvent(E1, "o1", "purchase", 1234, t), window=Window(60, 30))
    c = StoredCustomer("c1", s, "Champions", 3, (5, 4, 1), t, "purchase")
    fields = [fmt, "Champions", 3, 1, 1234, 0, t, t, [blake_text(E1)],
              [["o1", 1234, 0, 20_000]], [[20_000 // 30, 1, 1234, 0]], 541, t, "purchase"]
    old = orjson.dumps(fields) if fmt == 2 else msgpack.packb(fields, use_bin_type=False)
    assert decode("c1", old) == c  # a long id's 72-bit digest text and a short id's text
    s2, again = apply_event(c.state, StateEvent(E1, "o1", "purchase", 1234, t))
    assert again is False
    assert decode("c1", encode(c)) == c


def test_formats_2_and_3_are_still_written_when_asked_from_text_ids():
    t = 20_000 * DAY
    s, _ = apply_event(None, StateEvent(E1, O1, "purchase", 1234, t), TEXT)
    c = StoredCustomer("c1", s, "Champions", 3, (5, 4, 1), t, None)
    by_fields = [2, "Champions", 3, 1, 1234, 0, t, t, [blake_text(E1)],
                 [[blake_text(O1), 1234, 0, 20_000]], [], 541, t, None]
    assert orjson.loads(encode(c, 2)) == by_fields
    assert msgpack.unpackb(encode(c, 3)) == [3, *by_fields[1:]]
    for fmt in (2, 3):
        assert decode("c1", encode(c, fmt), text_ids=True) == c
    digests = decode("c1", encode(c, 3))  # converted when read by a store writing format 4
    assert digests is not None and digests.state.recent_event_ids == (blake(E1),)
    assert encode(c, 4) == encode(digests)  # and when written in format 4
    with pytest.raises(ValueError, match="2, 3 or 4"):
        encode(c, 1)


@pytest.mark.parametrize("value", [b"[2,1]", b"\x9e\x03", b"\xc1", b"\x91" * 2000,
                                   b'[2,"Champions",null,1,100,0,"abc",0,[],[],[],555,null,null]',
                                   b'[2,null,null,1,100,0,5,5,{},[],[],null,null,null]',
                                   b'[2,null,null,1,100,0,5,5,[],[["o",1,0]],[],null,null,null]',
                                   b'[2,null,null,true,100,0,5,5,[],[],[],null,null,null]',
                                   b'[2,null,null,1,100,0,5,5,[],[],[[1,2,3,"4"]],null,null,7]',
                                   msgpack.packb([3, None, None, 1, 5, 0, 1, 1, [], 5, [], None,
                                                  None, None]), b"[9" + b",0" * 13 + b"]",
                                   msgpack.packb([5] + [None] * 13), b"not a value", b"",
                                   # out of range (a breaker's: the export and the customer
                                   # view failed with tracebacks)
                                   msgpack.packb([3, None, None, 1, 2**63, 0, 1, 1, [], [], [],
                                                  None, None, None]),
                                   msgpack.packb([3, None, None, 1, 5, 0, 2**62, 1, [], [], [],
                                                  None, None, None]),
                                   msgpack.packb([3, None, None, -1, 5, 0, 1, 1, [], [], [],
                                                  None, None, None]),
                                   # a window bucket's counts out of range; format 1's ids
                                   # not text (an AttributeError got through)
                                   msgpack.packb([3, None, None, 1, 5, 0, 1, 1, [], [],
                                                  [[657, -5, 1100, 0]], None, None, None]),
                                   b'[1,"Hibernating",null,1,1000,0,1,1,[{}],[],[],111,null,'
                                   b'null]',
                                   # format 4: event ids not whole digests, order columns of
                                   # different lengths, an order id blob too short, a
                                   # segment that is not UTF-8, orders as format 3's
                                   msgpack.packb([4, None, None, 1, 5, 0, 1, 1, b"x" * 9,
                                                  [b"", [], [], []], [], None, None, None]),
                                   msgpack.packb([4, None, None, 1, 5, 0, 1, 1, b"",
                                                  [b"o" * 8, [5], [0, 0], [1]], [], None,
                                                  None, None]),
                                   msgpack.packb([4, None, None, 1, 5, 0, 1, 1, b"",
                                                  [b"o" * 7, [5], [0], [1]], [], None, None,
                                                  None]),
                                   msgpack.packb([4, b"\xff", None, 1, 5, 0, 1, 1, b"",
                                                  [b"", [], [], []], [], None, None, None]),
                                   msgpack.packb([4, None, None, 1, 5, 0, 1, 1, b"",
                                                  [[b"o" * 8, 5, 0, 1]], [], None, None,
                                                  None]),
                                   msgpack.packb([4, None, None, 1, 5, 0, 1, 1, b"",
                                                  [b"o" * 8, b"\x05", b"\x00", b"\x01"], [],
                                                  None, None, None]),
                                   # a breaker's: out of range in format 4's order columns (a
                                   # refund then failed to encode: OverflowError, naming no
                                   # customer), a negative cluster, scores outside 1-5
                                   msgpack.packb([4, None, None, 1, 5, 0, 1, 1, b"",
                                                  [b"o" * 8, [-5], [2**64 - 1], [1]], [],
                                                  None, None, None]),
                                   msgpack.packb([4, None, None, 1, 5, 0, 1, 1, b"",
                                                  [b"o" * 8, [5], [0], [-99]], [],
                                                  None, None, None]),
                                   msgpack.packb([4, None, -7, 1, 5, 0, 1, 1, b"",
                                                  [b"", [], [], []], [], None, None, None]),
                                   msgpack.packb([4, None, None, 1, 5, 0, 1, 1, b"",
                                                  [b"", [], [], []], [], 509, None, None]),
                                   msgpack.packb([4, None, None, 1, 5, 0, 1, 1, b"",
                                                  [b"", [], [], []], [], -1, None, None]),
                                   msgpack.packb([3, None, None, 1, 5, 0, 1, 1, [],
                                                  [["o", 5, 2**64 - 1, 1]], [], None, None,
                                                  None]),
                                   b'[2,null,null,1,5,0,1,1,[],[["o",-5,0,1]],[],null,null,'
                                   b'null]',
                                   # a held cause that is no change cause (breaker round 2: it
                                   # was published as the change's cause)
                                   msgpack.packb([4, None, None, 1, 5, 0, 1, 1, b"",
                                                  [b"", [], [], []], [], None, None,
                                                  "bogus"])])
def test_malformed_or_unknown_values_raise_value_error(value):
    with pytest.raises(ValueError, match="customer 'c1'"):
        decode("c1", value)


def test_a_value_nested_too_deeply_says_so():
    with pytest.raises(ValueError, match="StackError: Too nested"):
        decode("c1", b"\x9e\x03" + b"\x91" * 2000)


def test_day_resolution_keeps_window_buckets_of_the_order():
    w = Window(60, 30)
    late = 29 * DAY + DAY - 1  # the last ms of day 29: bucket 0
    s, _ = apply_event(None, StateEvent("e1", "o1", "purchase", 500, late), window=w)
    s, _ = apply_event(s, StateEvent("e2", "o1", "refund", 500, 31 * DAY), window=w)
    # the full refund takes the order out of bucket 0, where its first line was
    assert [(b.index, b.orders) for b in s.buckets] == [(0, 0), (1, 0)]
    assert frequency_monetary(s, 40 * DAY, w) == (0, 0)


def test_the_cli_version_names_the_format_it_writes():
    """README "Upgrading": ``rfm-stream --version`` tells which format a release writes."""
    import tomllib
    from pathlib import Path

    from click.testing import CliRunner

    from stream.cli import main

    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    out = CliRunner().invoke(main, ["--version"])
    assert out.exit_code == 0
    assert out.output.strip().endswith(f"{project['project']['version']} (customer values: "
                                       "writes format 4 unless RFM_STATE_FORMAT asks for "
                                       "2 or 3, reads 1-4)")
