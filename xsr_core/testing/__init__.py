"""Test and demo support: tiny random-weight models in the real file formats (no downloads)."""
