"""The stored customer value: compact ids, day-resolution order times, MessagePack, and the
JSON formats 1 (full ids, times in ms) and 2 still read."""

from __future__ import annotations

import msgpack
import orjson
import pytest

from state.codec import StoredCustomer, decode, encode
from state.rfm import StateEvent, Window, apply_event, frequency_monetary, id_key

DAY = 86_400_000
E1 = "0b7e6a2c-5f1d-4c9a-9f7e-2d3b1a0c9e8f"  # UUID event ids and order ids (36 characters)
E2 = "7f3c1b9e-2a4d-4e8f-b6c5-1d0e9f8a7b6c"
O1 = "a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d"


def test_long_ids_are_remembered_by_digest_and_still_deduplicate():
    t = 20_000 * DAY + 5 * 3_600_000  # day 20000, 05:00 UTC
    s, ok1 = apply_event(None, StateEvent(E1, O1, "purchase", 1000, t))
    s, ok2 = apply_event(s, StateEvent(E1, O1, "purchase", 1000, t))  # published twice
    s, ok3 = apply_event(s, StateEvent(E2, O1, "refund", 1000, t + DAY))  # all of O1 back
    assert (ok1, ok2, ok3) == (True, False, True)
    assert (s.frequency, s.monetary_minor) == (0, 0)  # the refund found the order by digest
    assert all(len(e) == 13 and e.startswith("#") for e in s.recent_event_ids)
    assert s.orders[0].order_id != O1 and len(s.orders[0].order_id) == 13
    assert s.orders[0].first_day == 20_000


def test_ids_starting_with_hash_never_collide_with_kept_short_ids():
    assert id_key("#abc") != "#abc" and id_key("#abc").startswith("#")
    assert id_key("o1") == "o1" and id_key("x" * 13) == "x" * 13 and id_key("x" * 14) != "x" * 14


def test_format_1_values_are_read_converted_and_rewritten_as_format_3():
    t = 20_000 * DAY + 5 * 3_600_000
    v1 = orjson.dumps([1, "New Customers", None, 1, 1000, 0, t, t, [E1], [[O1, 1000, 0, t]],
                       [], 555, t, None])
    c = decode("c1", v1)
    assert c is not None and c.scores == (5, 5, 5) and c.segment == "New Customers"
    s, again = apply_event(c.state, StateEvent(E1, O1, "purchase", 1000, t))
    assert again is False  # the event stored in format 1 is recognised
    s, ok = apply_event(s, StateEvent(E2, O1, "refund", 1000, t + DAY))
    assert ok and s.frequency == 0  # and so is the order
    stored = msgpack.unpackb(encode(c))
    assert stored[0] == 3 and stored[8] == [id_key(E1)] and stored[9] == [[id_key(O1), 1000, 0,
                                                                            20_000]]
    assert decode("c1", encode(c)) == c


def test_format_2_json_values_read_as_the_same_customer_in_format_3():
    t = 20_000 * DAY
    s, _ = apply_event(None, StateEvent(E1, O1, "purchase", 1234, t), window=Window(60, 30))
    c = StoredCustomer("c1", s, "Champions", 3, (5, 4, 1), t, "purchase")
    v2 = orjson.dumps([2, "Champions", 3, 1, 1234, 0, t, t, [id_key(E1)],
                       [[id_key(O1), 1234, 0, 20_000]], [[20_000 // 30, 1, 1234, 0]], 541, t,
                       "purchase"])
    assert decode("c1", v2) == c and decode("c1", v2.decode()) == c  # bytes or text
    v3 = encode(c)
    assert v3[:1] == b"\x9e" and decode("c1", v3) == c
    assert len(v3) < len(v2) * 0.8  # integers and ids without digits and quotes


def test_format_2_is_still_written_when_asked_as_the_releases_before_format_3_read_it():
    t = 20_000 * DAY
    s, _ = apply_event(None, StateEvent(E1, O1, "purchase", 1234, t))
    c = StoredCustomer("c1", s, "Champions", 3, (5, 4, 1), t, None)
    # the JSON of format 2, by its documented fields
    assert orjson.loads(encode(c, 2)) == [2, "Champions", 3, 1, 1234, 0, t, t, [id_key(E1)],
                                          [[id_key(O1), 1234, 0, 20_000]], [], 541, t, None]
    assert decode("c1", encode(c, 2)) == c
    with pytest.raises(ValueError, match="2 or 3"):
        encode(c, 1)


@pytest.mark.parametrize("value", [b"[2,1]", b"\x9e\x03", b"\xc1", b"\x91" * 2000,
                                   b'[2,"Champions",null,1,100,0,"abc",0,[],[],[],555,null,null]',
                                   b'[2,null,null,1,100,0,5,5,{},[],[],null,null,null]',
                                   b'[2,null,null,1,100,0,5,5,[],[["o",1,0]],[],null,null,null]',
                                   b'[2,null,null,true,100,0,5,5,[],[],[],null,null,null]',
                                   b'[2,null,null,1,100,0,5,5,[],[],[[1,2,3,"4"]],null,null,7]',
                                   msgpack.packb([3, None, None, 1, 5, 0, 1, 1, [], 5, [], None,
                                                  None, None]), b"[9" + b",0" * 13 + b"]",
                                   msgpack.packb([4] + [None] * 13), b"not a value", b"",
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
                                   b'null]'])
def test_malformed_or_unknown_values_raise_value_error(value):
    with pytest.raises(ValueError, match="customer 'c1'"):
        decode("c1", value)


def test_day_resolution_keeps_window_buckets_of_the_order():
    w = Window(60, 30)
    late = 29 * DAY + DAY - 1  # the last ms of day 29: bucket 0
    s, _ = apply_event(None, StateEvent("e1", "o1", "purchase", 500, late), window=w)
    s, _ = apply_event(s, StateEvent("e2", "o1", "refund", 500, 31 * DAY), window=w)
    # the full refund takes the order out of bucket 0, where its first line was
    assert [(b.index, b.orders) for b in s.buckets] == [(0, 0), (1, 0)]
    assert frequency_monetary(s, 40 * DAY, w) == (0, 0)
