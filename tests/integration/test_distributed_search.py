"""The Ray search equals the single-process kernel bitwise, on a multi-node cluster, also after a killed task.

One ``ray.cluster_utils.Cluster`` (a head and two worker nodes, real processes) serves the whole module. Every worker
process of the driver's job runs ``arm_tile_killer`` at start-up (runtime_env ``worker_process_setup_hook``): while
a file ``armed`` exists in the marker folder, the first attempt of tile (0, 0) anywhere in the cluster ends its own
worker process with ``os._exit``; its retry leaves a file ``retried``. The test of a killed task arms it.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

pytestmark = pytest.mark.slow

KILLED_TILE = (0, 0)


def arm_tile_killer() -> None:
    """worker_process_setup_hook: wrap kernel.search_tile so that an armed first attempt of KILLED_TILE kills the
    worker process (see the module docstring)."""
    import raymem.search.kernel as kernel

    markers = os.environ["RAYMEM_TEST_MARKERS"]
    search_tile = kernel.search_tile

    def search_tile_or_die(a_block, b_block, *, a_offset, b_offset, **options):
        if (a_offset, b_offset) == KILLED_TILE and os.path.exists(os.path.join(markers, "armed")):
            try:
                os.close(os.open(os.path.join(markers, "killed"), os.O_CREAT | os.O_EXCL))
                os._exit(1)
            except FileExistsError:
                open(os.path.join(markers, "retried"), "w").close()
        return search_tile(a_block, b_block, a_offset=a_offset, b_offset=b_offset, **options)

    kernel.search_tile = search_tile_or_die


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head node and two worker nodes; the driver joins with the tile killer installed in its workers."""
    import ray
    from ray import cloudpickle
    from ray.cluster_utils import Cluster

    markers = tmp_path_factory.mktemp("markers")
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 200 * 2**20})
    workers = [cluster.add_node(num_cpus=2, object_store_memory=200 * 2**20) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, runtime_env={
        "worker_process_setup_hook": arm_tile_killer, "env_vars": {"RAYMEM_TEST_MARKERS": str(markers)},
    })
    yield {"ray": ray, "markers": markers, "workers": workers}
    ray.shutdown()
    cluster.shutdown()


def results_equal(first, second) -> bool:
    return all(torch.equal(getattr(first, name), getattr(second, name)) for name in first.__dataclass_fields__)


def batches(rows: np.ndarray, size: int):
    """Row batches of a size unrelated to the tile grid, as Parquet row groups would come."""
    return (rows[start : start + size] for start in range(0, len(rows), size))


@pytest.mark.parametrize("n, m, d, k, block_rows, top_pairs", [(700, 900, 32, 5, 256, 0), (513, 260, 16, 3, 100, 50)])
def test_distributed_search_equals_single_process_bitwise(cluster, n, m, d, k, block_rows, top_pairs):
    from raymem.search import distributed, kernel

    rng = np.random.default_rng(n)
    a, b = rng.standard_normal((n, d)).astype(np.float32), rng.standard_normal((m, d)).astype(np.float32)
    expected = kernel.search(torch.from_numpy(a), torch.from_numpy(b), k=k, block_rows=block_rows,
                             top_pairs=top_pairs, band=1e-3)

    found = distributed.search(distributed.put_blocks(batches(a, 77), block_rows, d),
                               distributed.put_blocks(batches(b, 131), block_rows, d),
                               k=k, top_pairs=top_pairs, band=1e-3, max_in_flight=3)

    assert results_equal(found, expected)


def test_a_killed_tile_task_is_retried_and_the_result_is_unchanged(cluster):
    from raymem.search import distributed, kernel

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((600, 24)).astype(np.float32), rng.standard_normal((500, 24)).astype(np.float32)
    expected = kernel.search(torch.from_numpy(a), torch.from_numpy(b), k=4, block_rows=128)
    (cluster["markers"] / "armed").touch()

    found = distributed.search(distributed.put_blocks(batches(a, 128), 128, 24),
                               distributed.put_blocks(batches(b, 128), 128, 24), k=4, max_in_flight=4)

    (cluster["markers"] / "armed").unlink()
    retried = [(cluster["markers"] / name).exists() for name in ("killed", "retried")]
    assert retried == [True, True] and results_equal(found, expected)


def test_distributed_audit_equals_the_single_process_audit(cluster, tmp_path):
    from raymem.audit.embeddings import run_audit

    rng = np.random.default_rng(1)
    uris = []
    for name, n in (("train", 500), ("val", 150), ("synthetic", 400), ("test", 150), ("null", 120)):
        embeddings = rng.standard_normal((n, 16)).astype(np.float32)
        pq.write_table(pa.table({
            "sample_id": [f"{name}{i}" for i in range(n)],
            "patient_id": [f"{name}-patient{i // 3}" for i in range(n)],
            "embedding": pa.array(list(embeddings), type=pa.list_(pa.float32(), 16)),
        }), tmp_path / f"{name}.parquet", row_group_size=61)
        uris.append(str(tmp_path / f"{name}.parquet"))
    options = {"calibration": "generator", "plant_copies": 20, "block_rows": 128, "progress": False,
               "test_uri": uris[3], "null_uri": uris[4], "reference_ids": [f"train{i}" for i in range(0, 500, 2)]}

    single, spread = run_audit(*uris[:3], **options), run_audit(*uris[:3], distributed=True, **options)

    assert (spread.metrics, spread.matches.to_pylist()) == (single.metrics, single.matches.to_pylist())
