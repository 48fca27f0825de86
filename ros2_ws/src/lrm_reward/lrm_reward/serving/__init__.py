"""Serving the reward model to many robots: building and running the vLLM servers the "vllm" backend asks."""
