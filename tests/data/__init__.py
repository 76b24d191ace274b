"""Tests of megatron/remoe/data/."""
