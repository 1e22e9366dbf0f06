"""`ray job submit --working-dir . -- python jobs/pipeline.py --config jobs/configs/<study>.yaml`: the whole study.

data -> train-detector -> train-ldm -> sample -> train-null-ldm -> sample-null -> audit (the audit embeds training,
validation and synthetic images itself, so the standalone embed stage is not repeated here; the two null stages train
and sample the generator-null on held-out patients, and are skipped when the job has no null section). Resubmit with
the same --run-name to resume.
"""

import sys

from raymem.jobconfig import main

if __name__ == "__main__":
    sys.exit(main(("data", "train-detector", "train-ldm", "sample", "train-null-ldm", "sample-null", "audit")))
