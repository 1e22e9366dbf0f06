"""Synthetic samples from the trained LDM (Ray Data actors).

`ray job submit --working-dir . -- python jobs/sample.py --config jobs/configs/<study>.yaml`
"""

import sys

from raymem.jobconfig import main

if __name__ == "__main__":
    sys.exit(main(("sample",)))
