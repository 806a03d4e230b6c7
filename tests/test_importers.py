"""Tests for the dataset importers, on tiny files in each dataset's original format."""

import gzip
from pathlib import Path

import pandas as pd
import pytest

from propensity.importers import IMPORTERS
from propensity.importers.diginetica import import_diginetica
from propensity.importers.rees46 import import_rees46
from propensity.importers.uci_online_retail import DEFAULT_SOURCE as UCI_SOURCE
from propensity.importers.uci_online_retail import import_uci_online_retail
from propensity.raw_data import load_raw_dataset

UCI_CSV = """InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country
536365,85123A,WHITE HANGING HEART,6,2010-12-01 08:26:00,2.55,17850,United Kingdom
536365,POST,POSTAGE,1,2010-12-01 08:26:00,18.00,17850,United Kingdom
536366,85123a,"HEART, WHITE",2,2011-06-01 10:00:00,2.65,,United Kingdom
C536367,85123A,WHITE HANGING HEART,-3,2011-06-02 09:00:00,2.55,17850,United Kingdom
A563185,B,Adjust bad debt,1,2011-08-12 14:50:00,11062.06,,United Kingdom
536368,22728,ALARM CLOCK,-4,2011-07-01 12:00:00,3.75,12583,France
536369,22728,ALARM CLOCK,0,2011-07-01 12:00:00,0.00,12583,France
536370,22728,ALARM CLOCK,24,2011-07-01 12:30:00,3.75,12583,France
"""


def _gz(path: Path, text: str) -> Path:
    path.write_bytes(gzip.compress(text.encode()))
    return path


def test_uci_rows_map_exactly(tmp_path: Path) -> None:
    source = _gz(tmp_path / "online_retail.csv.gz", UCI_CSV)
    lines: list[str] = []
    summary = import_uci_online_retail(source, tmp_path / "out", progress=lines.append)
    assert summary.dropped == {
        "adjustment invoice (A prefix, bad debt)": 1,
        "non-product stock code": 1,
        "missing CustomerID": 1,
        "UnitPrice <= 0": 1,
        "Quantity <= 0 on a non-cancellation invoice": 1,
        "Quantity >= 0 on a cancellation invoice": 0,
    }
    assert summary.rows_in == 8 and lines
    data = load_raw_dataset(tmp_path / "out", strict=True)
    events = data.events
    assert events[["event_id", "user_id", "item_id", "event_type", "session_id", "quantity", "price"]].to_dict("records") == [
        {"event_id": "536365:1", "user_id": "17850", "item_id": "85123A", "event_type": "purchase",
         "session_id": "536365", "quantity": 6.0, "price": 2.55},
        {"event_id": "C536367:1", "user_id": "17850", "item_id": "85123A", "event_type": "return",
         "session_id": "C536367", "quantity": 3.0, "price": 2.55},
        {"event_id": "536370:1", "user_id": "12583", "item_id": "22728", "event_type": "purchase",
         "session_id": "536370", "quantity": 24.0, "price": 3.75},
    ]
    # Winter: London = UTC; summer: London = UTC+1.
    assert events["event_time"].tolist() == [
        pd.Timestamp("2010-12-01T08:26:00Z"), pd.Timestamp("2011-06-02T08:00:00Z"),
        pd.Timestamp("2011-07-01T11:30:00Z"),
    ]
    items = data.items.set_index("item_id")
    # The customer-less sale still counts for the catalogue (title, median price); POST does not.
    assert sorted(items.index) == ["22728", "85123A"]
    assert items.loc["85123A", "title"] in {"WHITE HANGING HEART", "HEART, WHITE"}
    assert items.loc["85123A", "price"] == pytest.approx(2.6)
    assert items["category_id"].isna().all()
    assert data.users.set_index("user_id")["region"].to_dict() == {"12583": "France", "17850": "United Kingdom"}


REES46_CSV = """event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session
2019-10-01 00:00:00 UTC,view,44600062,2103807459595387724,,shiseido,35.79,541312140,s-1
2019-10-01 00:00:00 UTC,view,44600062,2103807459595387724,,shiseido,35.79,541312140,s-1
2019-10-01 00:01:00 UTC,cart,44600062,2103807459595387724,,shiseido,36.00,541312140,s-1
2019-10-01 00:02:00 UTC,remove_from_cart,44600062,2103807459595387724,,shiseido,36.00,541312140,s-1
2019-10-01 00:03:00 UTC,purchase,3900821,2053013552326770905,appliances.water_heater,,33.20,554748717,
"""


def test_rees46_rows_map_exactly(tmp_path: Path) -> None:
    source = _gz(tmp_path / "sample.csv.gz", REES46_CSV)
    summary = import_rees46(source, tmp_path / "out", progress=lambda _: None)
    assert summary.dropped == {"exact duplicate row": 1, "remove_from_cart (no raw event type)": 1,
                               "other unknown event_type": 0}
    data = load_raw_dataset(tmp_path / "out", strict=True)
    assert data.events[["event_type", "item_id", "user_id", "session_id", "price"]].values.tolist() == [
        ["view", "44600062", "541312140", "s-1", 35.79],
        ["add_to_cart", "44600062", "541312140", "s-1", 36.0],
        ["purchase", "3900821", "554748717", None, 33.2],
    ]
    items = data.items.set_index("item_id")
    assert items.loc["44600062", ["category_id", "brand", "price"]].tolist() == ["2103807459595387724", "shiseido", 36.0]
    assert items.loc["3900821", "brand"] is None


def test_diginetica_rows_map_exactly(tmp_path: Path) -> None:
    _gz(tmp_path / "sample_train-item-views.csv.gz",
        "session_id;user_id;item_id;timeframe;eventdate\n1;NA;81766;1000;2016-05-09\n2;NA;5;0;2016-05-10\n")
    _gz(tmp_path / "train-purchases.csv.gz",
        "sessionId;userId;timeframe;eventdate;ordernumber;itemId\n1;42;90000000;2016-05-10;7;81766\n")
    _gz(tmp_path / "product-categories.csv.gz", "itemId;categoryId\n81766;1096\n")
    import_diginetica(tmp_path, tmp_path / "out", progress=lambda _: None)
    data = load_raw_dataset(tmp_path / "out", strict=True)
    rows = data.events[["event_time", "user_id", "event_type", "session_id"]].values.tolist()
    # Session 1 starts at 2016-05-08 23:59:59, the latest start consistent with both dates;
    # its anonymous view line takes the user id of its purchase line.
    assert rows == [
        [pd.Timestamp("2016-05-09T00:00:00Z"), "42", "view", "1"],
        [pd.Timestamp("2016-05-10T00:00:00Z"), "anon-session-2", "view", "2"],
        [pd.Timestamp("2016-05-10T00:59:59Z"), "42", "purchase", "1"],
    ]
    assert data.items.set_index("item_id")["category_id"].to_dict() == {"5": None, "81766": "1096"}


def test_registry_names() -> None:
    assert set(IMPORTERS) == {"uci-online-retail", "rees46", "diginetica"}


@pytest.mark.skipif(not UCI_SOURCE.exists(), reason="UCI Online Retail file not present")
def test_uci_real_file_counts_are_plausible(tmp_path: Path) -> None:
    summary = import_uci_online_retail(UCI_SOURCE, tmp_path, progress=lambda _: None)
    assert summary.rows_in == 541_909
    assert 4_300 <= summary.users <= 4_400
    assert 3_600 <= summary.items <= 4_000
    assert summary.events_by_type["purchase"] > 390_000 and summary.events_by_type["return"] > 8_000
    assert summary.dropped["missing CustomerID"] > 130_000
