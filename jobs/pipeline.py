"""`ray job submit --working-dir . -- python jobs/pipeline.py --config jobs/configs/<study>.yaml`: the whole study.

data -> train-detector -> train-ldm -> sample -> audit (the audit embeds training, validation and synthetic images
itself, so the standalone embed stage is not repeated here). Resubmit with the same --run-name to resume.
"""

import sys

from raymem.jobconfig import main

if __name__ == "__main__":
    sys.exit(main(("data", "train-detector", "train-ldm", "sample", "audit")))
