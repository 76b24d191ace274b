"""The test suite (a package so that its helpers import as `tests.helpers.X` from the repository root)."""
