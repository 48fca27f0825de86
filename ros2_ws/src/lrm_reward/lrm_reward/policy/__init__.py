"""Running a LeRobot policy from the policy store on a robot, without ROS (policy_node and
sim_robot_node wrap it)."""
