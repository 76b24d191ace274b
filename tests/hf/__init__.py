"""Tests of megatron/remoe/hf/."""
