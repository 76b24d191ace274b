"""Tests of megatron/remoe/training/."""
