"""Tests of megatron/remoe/cli/."""
