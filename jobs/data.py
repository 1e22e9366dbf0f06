"""The dataset: phantom patients or an ingest of raw files.

`ray job submit --working-dir . -- python jobs/data.py --config jobs/configs/<study>.yaml`
"""

import sys

from raymem.jobconfig import main

if __name__ == "__main__":
    sys.exit(main(("data",)))
