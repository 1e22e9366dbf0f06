"""benchmarks/audit_process.py --quick: raymem audit-embeddings and the faiss-cpu audit run side by side on the same
files and agree on the paper's figures (the script stops when they do not); no timing is asserted."""

import json
import subprocess
import sys
from pathlib import Path

from raymem.audit.embeddings import PHASES

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "audit_process.py"


def test_the_quick_run_times_both_tools_and_every_raymem_phase(tmp_path):
    out = tmp_path / "quick.json"

    completed = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], capture_output=True,
                               text=True, timeout=300)

    assert completed.returncode == 0, completed.stderr[-3000:]
    (row,) = json.loads(out.read_text())["sizes"]
    assert (list(row["phases_median"]), len(row["raymem_seconds"]), len(row["faiss_seconds"])) == (
        [*PHASES, "start-up"], 1, 1)
