"""Live-server tests: the `comfy` server fixture and `write_png` live in tests/conftest.py
(shared with tests/browser)."""
