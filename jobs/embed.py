"""Embed the dataset's splits with the trained detector (Ray Data actors).

`ray job submit --working-dir . -- python jobs/embed.py --config jobs/configs/<study>.yaml`
"""

import sys

from raymem.jobconfig import main

if __name__ == "__main__":
    sys.exit(main(("embed",)))
