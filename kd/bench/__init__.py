"""Speed and memory benchmark of kd against plain PyTorch baselines: `python -m kd.bench`.

Every ratio is measured side by side in one process (ours and the baseline interleaved,
repeated, medians taken), so that the noise of a shared machine hits both alike. Figures that
need a process of their own (peak memory, torch.compile) run in children forked from a
forkserver that has already imported torch, so each starts as a fresh run does, in
milliseconds instead of seconds."""
