"""lrm_reward: dense rewards and episode judgments from a vision-language reward model.

Sub-packages:
- ``core``: pure Python (torch/transformers/peft/numpy only); runs with no ROS and no lerobot.
- ``ros``: thin rclpy nodes that convert messages and call the core.
- ``refinement``: recording, judging and policy fine-tuning (lerobot).

Nothing is imported here, so ``import lrm_reward.core`` never pulls in rclpy or lerobot.
"""
