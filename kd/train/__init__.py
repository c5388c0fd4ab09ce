"""The training core a run is made of: the runner (one run, start to end), the engine (the one
loop), checkpoints, the run folder (rundir), devices and precision, export, tracking, metrics
and the run folder's plots."""
