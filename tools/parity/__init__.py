"""The parallel-layout parity harness behind tools/parity_table.py and tests/training/test_parity.py:
`tiny_gpt` (the tiny model's flags, a tiny corpus, the trainer's environment) and `harness` (the
layouts, the jobs, the checks, and the worker script that records what every rank computes)."""
