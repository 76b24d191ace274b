"""Shared test helpers: `paths` (the repository root), `dist_utils` (N gloo processes), `moe_reference`
(canonical MoE weights and a dense reference), `pretrain_utils` (the trainer or a tool as a real process),
`foreign_loop` and `te_layout` (worker scripts), `log_lines` (what the package logged). The tiny model
and corpus and the parity harness are shipped with tools/parity_table.py in tools/parity/. Fixtures are
in tests/conftest.py."""
