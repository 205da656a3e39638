"""The test suite is a package so that tests share helpers by plain imports (`from tests.dist.train_entry
import ...`, `from tests.dist.albef_tiny import ...`) with the repository root on the path (pytest's
`pythonpath` in pyproject.toml), never by editing sys.path."""
