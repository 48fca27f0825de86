"""The lerobot side of lrm: record episodes into LeRobotDatasets, judge them with the reward model,
fine-tune a policy on the successes, and report.

Not for ROS code (the node lives in lrm_reward.ros) and not for model logic (lrm_reward.core).
"""
