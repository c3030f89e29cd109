"""The I/O-free core: every decision about a job, as plain synchronous code.

Modules here import the standard library and attrs only (never trio, anyio, purerpc or sqlite3;
``tests/test_core_purity.py`` checks it), so each can be tested without an event loop or files.
The actors in :mod:`joblet.actors` drive them.
"""
