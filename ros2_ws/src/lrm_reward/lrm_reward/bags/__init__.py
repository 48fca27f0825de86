"""Bags in: rosbag2 recordings (MCAP or sqlite3) into the recorder's LeRobotDataset layout; offline scoring.

`mapping` says which topic is which feature, `episode_windows` where episodes begin and end, `bag_source`
reads a bag (with the `rosbags` library, no ROS install needed), `importer` feeds the recorder, `scoring`
writes per-frame rewards. Nothing here imports rclpy.
"""
