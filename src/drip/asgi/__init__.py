"""Pure-ASGI provider middleware: hold before the handler, capture after it."""

from drip.asgi.middleware import DripMeter, Price, price, report_units

__all__ = ["DripMeter", "Price", "price", "report_units"]
