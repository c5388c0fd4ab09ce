"""Experiments built on the training core, each run a real training script in its own process:
searches (tune, study, trials, space), the leaderboard driver (leaderboard, experiment, scheduler,
record) and the reports (report, ranking, runs, stats)."""
