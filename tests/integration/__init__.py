"""Tests of megatron/remoe/integration.py and the examples of docs/integrations.md."""
