"""Tests of the method, megatron/remoe/*.py (router, regulariser, lambda rules, dial, spec, compat),
and of its MoE layer under parallel layouts."""
