"""Small utilities with no kd dependencies: atomic file writes, durations as text."""
