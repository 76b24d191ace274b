"""Tests of megatron/remoe/evaluation/."""
