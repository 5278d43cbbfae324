"""Read transaction files (the UCI Online Retail layout) into invoices (pure, stdlib).

Columns: InvoiceNo (a leading C marks a cancellation), StockCode,
Description, Quantity, InvoiceDate (YYYY-MM-DD HH:MM:SS), UnitPrice,
CustomerID (a float such as 12923.0, blank for guests), Country. Guest lines
are skipped; a cancellation becomes an invoice with a negative amount and no
product lines (it lowers monetary value, it is not a purchase of anything).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from engine.errors import ValidationError

_COLUMNS = ("InvoiceNo", "StockCode", "Quantity", "InvoiceDate", "UnitPrice", "CustomerID")


@dataclass
class Invoice:
    """One order (or cancellation) of one customer."""

    invoice: str
    customer: str
    ts: float
    amount: float
    items: list[str]  # distinct stock codes, in file order (empty for a cancellation)
    lines: list[dict]  # {product_id, name, price, quantity}

    @property
    def cancelled(self) -> bool:
        return self.invoice.startswith("C")


def _ts(text: str) -> float:
    return datetime.strptime(text.strip(), "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC).timestamp()


def read_invoices(path: str | Path) -> list[Invoice]:
    """Every customer invoice in the file, oldest first."""
    invoices: dict[tuple[str, str], Invoice] = {}
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in _COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise ValidationError(
                f"{path}: missing column(s) {', '.join(missing)}", field=missing[0]
            )
        for n, row in enumerate(reader, start=2):
            customer = (row["CustomerID"] or "").strip()
            if not customer:
                continue
            if customer.endswith(".0"):
                customer = customer[:-2]
            try:
                quantity = int(float(row["Quantity"]))
                price = float(row["UnitPrice"])
                ts = _ts(row["InvoiceDate"])
            except ValueError as exc:
                raise ValidationError(f"{path}:{n}: {exc}", field="row") from None
            number = row["InvoiceNo"].strip()
            key = (customer, number)
            invoice = invoices.get(key)
            if invoice is None:
                invoice = invoices[key] = Invoice(number, customer, ts, 0.0, [], [])
            invoice.amount += quantity * price
            code = row["StockCode"].strip()
            if not number.startswith("C") and quantity > 0 and code:
                if code not in invoice.items:
                    invoice.items.append(code)
                invoice.lines.append(
                    {
                        "product_id": code,
                        "name": (row.get("Description") or "").strip(),
                        "price": price,
                        "quantity": quantity,
                    }
                )
    out = sorted(invoices.values(), key=lambda i: (i.ts, i.invoice))
    for invoice in out:
        invoice.amount = round(invoice.amount, 2)
    return out


def order_event(invoice: Invoice) -> dict:
    """The invoice as a normalized Segment `Order Completed` track event."""
    return {
        "type": "track",
        "event": "Order Completed",
        "customer": invoice.customer,
        "userId": invoice.customer,
        "anonymousId": None,
        "messageId": f"inv-{invoice.invoice}-{invoice.customer}",
        "ts": invoice.ts,
        "receivedAt": invoice.ts,
        "properties": {
            "order_id": invoice.invoice,
            "revenue": invoice.amount,
            "products": invoice.lines,
        },
    }
