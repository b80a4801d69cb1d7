"""Test helpers: tiny deterministic models and fixtures (no network, no pretrained weights)."""
