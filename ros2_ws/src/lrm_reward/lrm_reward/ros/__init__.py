"""ROS 2 shell of lrm_reward: thin rclpy nodes and message conversions around the pure core."""
