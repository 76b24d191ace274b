"""Tests of megatron/remoe/dial_calibration/."""
