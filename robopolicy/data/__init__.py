"""Demonstrations as LeRobotDatasets: recording, reading, inspecting."""
