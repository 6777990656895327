"""Independent oracles shared by tests (written by hand or computed with pandas, never by
the code under test)."""

from __future__ import annotations

# The R x F grid written out by hand (rows R = 5..1, columns F = 1..5); M does not matter.
GRID = {
    5: ["New Customers", "Potential Loyalists", "Potential Loyalists", "Champions", "Champions"],
    4: ["Promising", "Potential Loyalists", "Potential Loyalists", "Loyal Customers",
        "Loyal Customers"],
    3: ["About To Sleep", "About To Sleep", "Need Attention", "Loyal Customers",
        "Loyal Customers"],
    2: ["Hibernating", "Hibernating", "At Risk", "At Risk", "Can't Lose Them"],
    1: ["Hibernating", "Hibernating", "At Risk", "At Risk", "Can't Lose Them"],
}


def cdnow_frame():
    """The shipped CDNOW file read with pandas (whitespace separated, ids kept as strings)."""
    import pandas as pd

    from stream.cdnow import open_default

    with open_default() as fh:
        return pd.read_csv(fh, compression="gzip", sep=r"\s+", dtype={"customer_id": str,
                                                                       "date": str})


def cdnow_rfm(as_of: str = "1998-06-30"):
    """Per customer: recency days to ``as_of``, frequency (rows), monetary in cents; with
    quintile scores from pandas ranks: score = 1 + floor(5 * worse / N)."""
    import pandas as pd

    df = cdnow_frame()
    df["day"] = pd.to_datetime(df["date"], format="%Y%m%d")
    g = df.groupby("customer_id").agg(last=("day", "max"), frequency=("day", "size"),
                                      monetary=("dollar_value", "sum"))
    g["recency_days"] = (pd.Timestamp(as_of) - g["last"]).dt.days
    g["monetary_cents"] = (g["monetary"] * 100).round().astype(int)
    n = len(g)
    worse_r = g["recency_days"].rank(method="min", ascending=False) - 1
    worse_f = g["frequency"].rank(method="min") - 1
    worse_m = g["monetary_cents"].rank(method="min") - 1
    g["r_score"] = (1 + (5 * worse_r) // n).astype(int)
    g["f_score"] = (1 + (5 * worse_f) // n).astype(int)
    g["m_score"] = (1 + (5 * worse_m) // n).astype(int)
    return g


def cdnow_state():
    """Per customer: frequency (rows), monetary in cents, last purchase (epoch ms), computed
    with pandas from the shipped file; the expected RFM state after loading all of it."""
    import pandas as pd

    df = cdnow_frame()
    day = pd.to_datetime(df["date"], format="%Y%m%d", utc=True)
    df["ms"] = (day - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(milliseconds=1)
    g = df.groupby("customer_id").agg(frequency=("ms", "size"), monetary=("dollar_value", "sum"),
                                      last_ms=("ms", "max"))
    g["monetary_cents"] = (g["monetary"] * 100).round().astype(int)
    return {cid: (int(r.frequency), int(r.monetary_cents), int(r.last_ms))
            for cid, r in g.iterrows()}
