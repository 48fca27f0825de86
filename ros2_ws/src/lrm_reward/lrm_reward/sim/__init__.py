"""Simulated robot for the demo and tests: the SO-101 scene and a noisy scripted expert."""
