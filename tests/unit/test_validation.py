"""Bad input gets a named reason; good input is reduced exactly (amounts to the cent)."""

from __future__ import annotations

import json

import pytest

from stream.validation import REASONS, Accepted, InputRules, Rejected, validate

NOW = 1_800_000_000_000  # 2027-01-15 in epoch ms
GOOD = {"event_id": "e1", "customer_id": "c1", "order_id": "o1", "type": "purchase",
        "amount": "12.34", "currency": "USD", "occurred_at": "1997-01-01T00:00:00+00:00"}


def check(value: bytes | None, key: bytes | None = b"c1", rules: InputRules = InputRules()):
    return validate(key, value, rules, NOW)


def with_(**changes):
    body = dict(GOOD)
    for k, v in changes.items():
        if v is ...:
            body.pop(k)
        else:
            body[k] = v
    return json.dumps(body).encode()


def test_good_event_reduced_exactly():
    got = check(with_(amount=11.77, occurred_at="1997-01-01T02:00:00+02:00"))
    assert isinstance(got, Accepted)
    assert got.event.amount_minor == 1177
    assert got.event.occurred_ms == 852076800000  # 1997-01-01T00:00:00Z
    refund = check(with_(type="refund", amount="0.5"))
    assert refund.event.kind == "refund" and refund.event.amount_minor == 50


@pytest.mark.parametrize("value,key,reason", [
    (b"not json at all", b"c1", "not_json"),
    (b"\xff\xfe\x00", b"c1", "not_utf8"),
    (b"[1, 2]", b"c1", "not_object"),
    (None, b"c1", "missing_value"),
    (with_(customer_id=...), b"c1", "missing_field"),
    (with_(customer_id=""), b"", "invalid_customer_id"),
    (with_(customer_id="   "), b"   ", "invalid_customer_id"),
    (with_(customer_id=42), b"42", "invalid_customer_id"),
    (with_(amount="-1.00"), b"c1", "invalid_amount"),
    (with_(amount="NaN"), b"c1", "invalid_amount"),
    (with_(amount="Infinity"), b"c1", "invalid_amount"),
    (with_(amount="1.234"), b"c1", "invalid_amount"),
    (with_(amount="twelve"), b"c1", "invalid_amount"),
    (with_(occurred_at="1997-01-01T00:00:00"), b"c1", "invalid_timestamp"),
    (with_(occurred_at="yesterday"), b"c1", "invalid_timestamp"),
    (with_(occurred_at=1700000000), b"c1", "invalid_timestamp"),
    (with_(occurred_at="20240101"), b"c1", "invalid_timestamp"),
    (with_(occurred_at="1.5"), b"c1", "invalid_timestamp"),
    (with_(occurred_at="1969-12-31T23:59:59Z"), b"c1", "invalid_timestamp"),
    (with_(occurred_at="0001-01-01T00:30:00+01:00"), b"c1", "invalid_timestamp"),
    (with_(amount="1_000"), b"c1", "invalid_amount"),
    (with_(amount="\u0661\u0662"), b"c1", "invalid_amount"),
    (with_(amount="1e3"), b"c1", "invalid_amount"),
    (with_(amount=True), b"c1", "invalid_amount"),
    (with_(amount="100000000000.00"), b"c1", "invalid_amount"),
    (with_(occurred_at="2099-01-01T00:00:00Z"), b"c1", "future_event_time"),
    (with_(type="gift"), b"c1", "unknown_event_type"),
    (with_(currency="EUR"), b"c1", "unsupported_currency"),
    (with_(quantity="many"), b"c1", "invalid_field"),
    (with_(schema_version=2), b"c1", "unsupported_schema_version"),
    (with_(schema_version=0), b"c1", "unsupported_schema_version"),
    (with_(schema_version="1"), b"c1", "unsupported_schema_version"),
    (with_(schema_version=True), b"c1", "unsupported_schema_version"),
    (with_(schema_version=1.0), b"c1", "unsupported_schema_version"),
    # a later schema that also changed a field: the version is the reason (a breaker's case)
    (with_(schema_version=2, amount={"value": 12, "currency": "USD"}), b"c1",
     "unsupported_schema_version"),
    (with_(schema_version=2, occurred_at=1700000000000), b"c1", "unsupported_schema_version"),
    (with_(), b"someone-else", "key_mismatch"),
    (with_(), None, "key_mismatch"),
    (b"{" + b" " * 70000 + b"}", b"c1", "oversized"),
])
def test_bad_input_catalogue(value, key, reason):
    got = check(value, key)
    assert isinstance(got, Rejected), got
    assert got.reason == reason, got
    assert got.reason in REASONS and got.detail


def test_details_stay_small_for_huge_keys():
    got = check(with_(), key=b"\xff" * 300_000)
    assert got.reason == "key_mismatch" and len(got.detail) < 300


def test_other_currency_decimals():
    jpy = InputRules(currency="JPY", currency_decimals=0)
    assert check(with_(currency="JPY", amount="1200"), rules=jpy).event.amount_minor == 1200
    assert check(with_(currency="JPY", amount="12.5"), rules=jpy).reason == "invalid_amount"


def test_an_event_time_is_accepted_up_to_the_future_skew_and_refused_one_ms_past_it():
    """``RFM_MAX_FUTURE_SKEW_S`` (default one day) past the wall clock is still accepted; a
    millisecond more is ``future_event_time``. NOW = 2027-01-15T08:00:00Z, hand-converted."""
    assert NOW == 1_800_000_000_000
    at_limit = check(with_(occurred_at="2027-01-16T08:00:00.000Z"))
    past = check(with_(occurred_at="2027-01-16T08:00:00.001Z"))
    assert isinstance(at_limit, Accepted) and at_limit.event.occurred_ms == NOW + 86_400_000
    assert isinstance(past, Rejected) and past.reason == "future_event_time"
    tight = InputRules(max_future_skew_ms=0)
    assert isinstance(check(with_(occurred_at="2027-01-15T08:00:00Z"), rules=tight), Accepted)
    assert check(with_(occurred_at="2027-01-15T08:00:01Z"), rules=tight).reason == \
        "future_event_time"
