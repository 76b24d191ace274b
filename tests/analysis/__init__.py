"""Tests of megatron/remoe/analysis/."""
