"""Test and demo helpers: tiny random-weight models and fixtures (no downloads)."""
