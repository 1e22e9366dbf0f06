"""Train the latent diffusion model (Ray Train).

`ray job submit --working-dir . -- python jobs/train_ldm.py --config jobs/configs/<study>.yaml`
"""

import sys

from raymem.jobconfig import main

if __name__ == "__main__":
    sys.exit(main(("train-ldm",)))
