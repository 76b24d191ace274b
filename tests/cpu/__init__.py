"""Tests of megatron/remoe/cpu/."""
