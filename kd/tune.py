"""`python -m kd.tune` and the `kd-tune` console script; the code is kd.lab.tune."""

from kd.lab.tune import main

if __name__ == "__main__":
    main()
