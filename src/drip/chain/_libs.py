"""The chain libraries, imported once with the interpreter's recursion limit kept.

``eth_account`` imports ``py_ecc`` (through ``eth_keyfile``), whose import raises the
process's recursion limit to 100,000 for its own deep recursion. A server with that limit
no longer turns a deeply nested JSON body into a RecursionError (a 400): the parser
recurses past the thread's C stack and the whole process dies (SIGSEGV). Importing this
module first keeps the limit the process had.
"""

from __future__ import annotations

import sys

_LIMIT = sys.getrecursionlimit()
try:
    import eth_account  # noqa: F401 - imported for its side effect, undone below
finally:
    if sys.getrecursionlimit() != _LIMIT:
        sys.setrecursionlimit(_LIMIT)
