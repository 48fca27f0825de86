"""Adapting the reward model to a user's robot: training and evaluating LRM-style LoRA adapters.

- ``samples``: labelled training / evaluation samples for the three modalities from LeRobotDatasets.
- ``train``: ``lrm-train-reward``, one LoRA adapter per modality in the layout the engine loads.
- ``evaluate``: ``lrm-eval-reward``, held-out metrics for adapter sets side by side, with a report.
- ``metrics``: the metric formulas (pure numpy).

Not imported by the ROS nodes or the core: it needs lerobot (datasets) and torch/peft (training).
"""
