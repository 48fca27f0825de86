"""The reward core: prompts, parsing, model loading, readouts, interval-hold and fusion.

It imports torch/transformers/peft/numpy only (lazily where heavy), never rclpy or lerobot,
so it runs on a GPU server with neither installed. See ../../../../../shared/lrm-model-interface.md.
"""
