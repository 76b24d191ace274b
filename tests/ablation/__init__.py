"""Tests of megatron/remoe/ablation/."""
