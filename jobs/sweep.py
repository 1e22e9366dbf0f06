"""`ray job submit --working-dir . -- python jobs/sweep.py --config jobs/configs/study-<name>.yaml`: a factor sweep.

The study's data and copy detector once, then a Ray Tune trial per factor combination (an LDM trained with Ray
Train, audited at several epochs), a parent MLflow run with a child run per trial, and the dashboard. Resubmit the
same command to resume: finished trials are kept.
"""

import sys

from raymem.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))  # the CLI's parser and its one-line user errors
