"""Shared test helpers: `dist_utils` (N gloo processes), `moe_reference` (canonical MoE weights and
a dense reference), `pretrain_utils` (the trainer as a real process, a tiny corpus), `parity_utils`
(the parallel-layout parity harness, also tools/parity_table.py's), `log_lines` (what the package
logged). Fixtures are in tests/conftest.py."""
