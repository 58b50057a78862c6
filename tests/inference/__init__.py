"""Tests of the inference tier (inference/)."""
