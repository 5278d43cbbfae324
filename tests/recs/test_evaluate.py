from __future__ import annotations

from pathlib import Path

import pytest

from engine.insight.retail import read_invoices
from engine.recs.evaluate import evaluate, main, ndcg_at

HEADER = "InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country\n"


def test_ndcg_by_hand() -> None:
    assert ndcg_at(["a", "b"], {"b"}, 10) == pytest.approx(1 / 1.584962500721156)
    assert ndcg_at(["b", "a"], {"b"}, 10) == 1.0
    assert ndcg_at(["x"], {"b"}, 10) == 0.0


def write_history(path: Path) -> Path:
    """Ten customers buy A with B in spring; C is the shop's bestseller; in the test period
    each of them buys B (CF finds it: B goes with their A), nobody buys C."""
    lines = []
    n = 0
    for c in range(10):
        n += 1
        lines.append(f"{n},A,a,1,2011-03-01 10:00:00,1.0,{100 + c}.0,UK")
        if c < 5:  # half of them bought B with A
            lines.append(f"{n},B,b,1,2011-03-01 10:00:00,1.0,{100 + c}.0,UK")
    for c in range(30):  # strangers make C the most popular
        n += 1
        lines.append(f"{n},C,c,1,2011-04-01 10:00:00,1.0,{200 + c}.0,UK")
    for c in range(5, 10):  # the other half buy B after the cut
        n += 1
        lines.append(f"{n},B,b,1,2011-09-01 10:00:00,1.0,{100 + c}.0,UK")
    n += 1
    lines.append(f"C{n},A,a,-1,2011-09-02 10:00:00,1.0,100.0,UK")  # a cancellation
    lines.append(f"{n + 1},Z,z,1,2011-10-01 10:00:00,1.0,999.0,UK")
    path.write_text(HEADER + "\n".join(lines) + "\n")
    return path


def test_time_split_on_a_small_history(tmp_path: Path) -> None:
    invoices = read_invoices(write_history(tmp_path / "t.csv"))
    assert any(i.cancelled and i.amount == -1.0 and not i.items for i in invoices)
    result = evaluate(invoices, k=2, test_days=60)
    assert result.customers == 5
    assert result.hit_rate == 1.0  # B, from A's neighbours (C, blended popularity, ranks first)
    assert result.baseline_hit_rate == 0.0  # C and A, the bestsellers, are not what they bought
    assert 0 < result.ndcg < 1


def test_the_command_prints_both_rows(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_history(tmp_path / "t.csv")
    assert main(["evaluate", "--data", str(path), "--k", "2", "--test-days", "60"]) == 0
    out = capsys.readouterr()
    assert "item-to-item CF" in out.out and "baseline: popularity" in out.out
    assert "5/5 customers" in out.err
