"""The metering SDK: ``DripClient``, ``@meter``, debit, top-up, pause and resume."""

from drip.metering.client import DripClient, SyncDripClient, wallet_id
from drip.metering.meter import configure, last_charge, meter

__all__ = ["DripClient", "SyncDripClient", "configure", "last_charge", "meter", "wallet_id"]
