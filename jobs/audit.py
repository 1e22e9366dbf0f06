"""Embed, search and report: the memorization audit of the synthetic samples.

`ray job submit --working-dir . -- python jobs/audit.py --config jobs/configs/<study>.yaml`
"""

import sys

from raymem.jobconfig import main

if __name__ == "__main__":
    sys.exit(main(("audit",)))
