"""The Drip HTTP service: REST API, admin keys, metrics (``drip serve``)."""

from drip.server.app import create_app

__all__ = ["create_app"]
