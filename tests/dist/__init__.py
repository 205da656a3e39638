"""Multi-process tests and their helpers (`train_entry`, `albef_tiny`), importable as `tests.dist.*`."""
