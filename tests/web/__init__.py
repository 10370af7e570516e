"""Tests of the HTTP API (``web/``) on a real SQLite file, through Quart's test client and real HTTP."""
