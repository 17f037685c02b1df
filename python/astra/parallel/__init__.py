"""Sequence-parallel execution across processes/devices: runner, links, baselines."""
