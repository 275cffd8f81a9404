"""The ``drip`` command line."""
