"""Tests of the package as a whole: its import graph, and its behaviour on import as a library."""
