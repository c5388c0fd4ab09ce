"""`python -m kd.leaderboard` and the `kd-leaderboard` console script; the code is kd.lab.leaderboard."""

from kd.lab.leaderboard import main

if __name__ == "__main__":
    main()
