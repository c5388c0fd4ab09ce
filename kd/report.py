"""`python -m kd.report` and the `kd-report` console script; the code is kd.lab.report."""

from kd.lab.report import main

if __name__ == "__main__":
    main()
