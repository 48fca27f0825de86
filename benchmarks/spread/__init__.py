"""The parts of benchmarks/policy_spread.py: reading a finished demo run, rolling policies out in-process,
the refinement arms, the nightly rounds, and the bootstrap intervals their tables print.

What it is not: product code (nothing under ros2_ws imports it) or a test suite.
"""
