"""Tests of the `nixfleet` CLI: real subprocesses against a real control plane."""
