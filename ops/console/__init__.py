"""`driftwarden console`: a web client of the collector's operator API (ops/console/app.py)."""
