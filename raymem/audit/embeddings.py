"""The memorization audit on embeddings: read the embedding sets, search, decide, write the results.

Inputs follow the embedding schema of DESIGN.md: Parquet with ``sample_id`` (string), ``patient_id`` (string;
required for the real sets, optional for generated ones) and ``embedding`` (fixed_size_list<float32>[d] or a
variable list of length d), at a URI naming a file or a folder of ``*.parquet`` files (local path or s3://). The
roles (DESIGN.md): train (what may be memorized; restricted to the generator's own training set when its ids are
given), val (calibrates: sets the thresholds), test (evaluates: held-out patients on which every false-positive
rate is measured; without it, half of the validation patients), synthetic (the generator's own samples: the
headline figures describe these only), generator-null samples (optional), planted known copies and known novel
samples (scored apart, under ``planted``).

Outputs under ``out_uri``:

- ``metrics.json``: the figures of raymem.audit.metrics with their 95 % intervals (keys listed in
  ``audit_metrics``).
- ``matches.parquet``: one row per generated sample (``kind`` = "synthetic"), then one per training sample
  (``kind`` = "train"), then one per planted sample (``kind`` = "planted"). Columns: kind, sample_id, patient_id,
  neighbour_ids, neighbour_indices, neighbour_scores (lists, best first: a synthetic or planted sample's top-k
  training samples, a training sample's best generated sample), best_score, score_exact (the row was recomputed
  in float64 because a decision was near a threshold), is_copy (synthetic and planted rows; null on training
  rows), is_memorized (training rows; null otherwise), planted_from (the training sample_id a planted copy was made
  from; null otherwise). Indices count rows of the audited training set (synthetic and planted rows) or of the
  generated samples (training rows), in input order.

This module reads, orchestrates and writes; thresholds, figures and intervals are computed in raymem.audit.metrics
and raymem.audit.statistics, the search in raymem.search (single process, or Ray tasks with ``distributed=True``).
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from raymem import storage
from raymem.audit import metrics, statistics
from raymem.search import kernel

PLANTED_NOISE = 0.1  # planted copy = training embedding + N(0, (PLANTED_NOISE * the embedding's std)^2) per entry
REPORT_PAIRS = 24  # highest-scoring synthetic/training pairs handed to the report
MAX_TOP_PAIRS = 1 << 25  # largest train x validation scores the matched null may need (~0.7 GiB on the driver)
READ_BATCH_ROWS = 8192
MAX_BRACKET = 2  # generated samples beyond this many times the measurable draws: the memorized FPR gets a warning
MIN_GENERATED = 100  # fewer generated samples than this: the memorized shares' intervals get a warning
MIN_PAPER_NULL = 100  # fewer training images than this: the paper's tau (one null value per image) gets a warning
_MAX_NAMED = 10  # sample ids named in an error message


class EmbeddingSource:
    """One embedding-schema Parquet dataset. Reads the id columns on creation; streams embeddings on demand.

    sample_ids (n,) and patient_ids (n,) object arrays (patient_ids None where the column is absent); dim: d.
    """

    def __init__(self, uri: str, role: str, *, require_patients: bool):
        self.uri, self.role = uri, role
        files = storage.list_files(uri, (".parquet",))
        if not files:
            raise ValueError(f"{role} embeddings: no .parquet files at {uri}")
        self.file_uris = [storage.file_uri(uri, name) for name in files]
        ids, patients, dims = [], [], set()
        for file_uri in self.file_uris:
            parquet = self._open(file_uri)
            schema = parquet.schema_arrow
            missing = {"sample_id", "embedding"} - set(schema.names)
            if missing or (require_patients and "patient_id" not in schema.names):
                raise ValueError(
                    f"{role} embeddings {file_uri}: columns sample_id, embedding"
                    f"{', patient_id' if require_patients else ''} are required (embedding schema, DESIGN.md); "
                    f"found {schema.names}"
                )
            columns = ["sample_id"] + (["patient_id"] if "patient_id" in schema.names else [])
            table = parquet.read(columns=columns)
            ids.append(table["sample_id"].to_numpy(zero_copy_only=False).astype(object))
            if "patient_id" in schema.names:
                patients.append(table["patient_id"].to_numpy(zero_copy_only=False).astype(object))
            dims.add(_fixed_dim(schema.field("embedding").type))
        self.sample_ids = np.concatenate(ids) if ids else np.array([], dtype=object)
        self.patient_ids = np.concatenate(patients) if len(patients) == len(ids) else None
        if len(self.sample_ids) == 0:
            raise ValueError(f"{role} embeddings at {uri} have no rows")
        _require_unique(self.sample_ids, f"{role} sample_id", uri)
        if require_patients and any(p is None for p in self.patient_ids):
            raise ValueError(f"{role} embeddings at {uri}: patient_id is null in some rows; every row needs one")
        dims.discard(None)
        if len(dims) > 1:
            raise ValueError(f"{role} embeddings at {uri}: files disagree on the embedding size: {sorted(dims)}")
        self.dim = dims.pop() if dims else len(next(self.batches(1)).reshape(-1))

    def __len__(self) -> int:
        return len(self.sample_ids)

    @staticmethod
    def _open(file_uri: str) -> pq.ParquetFile:
        filesystem, path = storage.filesystem(file_uri)
        return pq.ParquetFile(filesystem.open_input_file(path))

    def batches(self, batch_rows: int = READ_BATCH_ROWS, rows: np.ndarray | None = None) -> Iterator[np.ndarray]:
        """Stream the embeddings as float32 batches (b, d) in row order, only ``rows`` (sorted indices) if given.

        Raises ValueError naming the sample_ids of rows that are null, of the wrong length, non-finite or constant.
        """
        start = 0
        for file_uri in self.file_uris:
            for batch in self._file_batches(file_uri, batch_rows):
                stop = start + batch.num_rows
                wanted = None if rows is None else rows[(rows >= start) & (rows < stop)] - start
                column = batch.column(0)
                if wanted is not None:
                    column = column.take(pa.array(wanted))
                ids = self.sample_ids[start:stop] if wanted is None else self.sample_ids[start:stop][wanted]
                yield self._matrix(column, ids)
                start = stop

    def _file_batches(self, file_uri: str, batch_rows: int) -> Iterator[pa.RecordBatch]:
        """One file's embedding column in batches. pyarrow cannot read back a null row of a fixed-size list column
        (it fails with a bare "Expected all lists to be of size=..."): that becomes an error naming the file."""
        try:
            yield from self._open(file_uri).iter_batches(batch_size=batch_rows, columns=["embedding"])
        except pa.ArrowInvalid as error:
            raise ValueError(
                f"{self.role} embeddings {file_uri}: the embedding column cannot be read ({error}); a null embedding "
                "in a fixed-size list column reads like this: fix or drop the null rows"
            ) from error

    def _matrix(self, column: pa.Array, ids: np.ndarray) -> np.ndarray:
        if column.null_count:
            raise ValueError(self._bad_rows("has a null embedding", ids[column.is_null().to_numpy(False)]))
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        expected = getattr(self, "dim", lengths[0] if len(lengths) else 0)
        if (lengths != expected).any():
            raise ValueError(self._bad_rows(f"embedding length differs from {expected}", ids[lengths != expected]))
        values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32)  # a writable copy
        matrix = values.reshape(len(column), expected)
        invalid = kernel.find_invalid_rows(torch.from_numpy(matrix)).numpy()
        if invalid.any():
            raise ValueError(self._bad_rows(
                "embedding is constant or not finite (Pearson correlation undefined)", ids[invalid]
            ))
        return matrix

    def _bad_rows(self, problem: str, ids: np.ndarray) -> str:
        named = ", ".join(map(str, ids[:_MAX_NAMED])) + (f" and {len(ids) - _MAX_NAMED} more" if len(ids) > _MAX_NAMED else "")
        return f"{self.role} embeddings at {self.uri}: {problem}: sample_id {named}; fix or drop these rows"


def _fixed_dim(embedding_type: pa.DataType) -> int | None:
    if pa.types.is_fixed_size_list(embedding_type):
        return embedding_type.list_size
    if pa.types.is_list(embedding_type) or pa.types.is_large_list(embedding_type):
        return None
    raise ValueError(f"embedding column has type {embedding_type}; expected a list of float32 (embedding schema)")


def _require_unique(ids: np.ndarray, what: str, uri: str) -> None:
    values, counts = np.unique(ids.astype(str), return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"{what} must be unique in {uri}; repeated: {', '.join(values[counts > 1][:_MAX_NAMED])}")


PHASES = ("read", "standardise", "search", "calibrate", "figures", "matches", "write")  # AuditResult.phase_seconds


class PhaseClock:
    """Wall seconds of an audit's phases (PHASES), in the order first entered; a phase entered again adds up.

    read: the Parquet files to float32 rows, checked (and planted samples made or read). standardise: each set
    centred, L2-normalised and rounded for the search's screen, once. search: every all-pairs search, with the
    float64 re-checks that the thresholds deciding which evaluation pairs to keep need. calibrate: every
    calibration's thresholds and decisions, with the remaining float64 re-checks near them. figures: metrics.json's
    figures and intervals, the report's pairs and patients. matches: the matches table. write: metrics.json and
    matches.parquet written to the output (``write_outputs``).
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        assert name in PHASES, name
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started


@dataclass
class _LocalSet:
    """One of the audit's sets in this process: raw rows (n, d) float32, and the same prepared for the search
    (standardized and rounded once, however often the set is searched) after ``_LocalEngine.prepare``."""

    raw: torch.Tensor
    prepared: kernel.PreparedRows | None = None

    @property
    def n_rows(self) -> int:
        return len(self.raw)


class _LocalEngine:
    """The search in this process: each set is a _LocalSet in memory."""

    def __init__(self, block_rows: int, progress: bool):
        self.block_rows, self.progress = block_rows, progress

    def put(self, batches: Iterable[np.ndarray], dim: int) -> _LocalSet:
        rows = np.concatenate([np.zeros((0, dim), np.float32), *batches])  # (0, d) if there are none
        return _LocalSet(torch.from_numpy(rows))

    def prepare(self, rows: _LocalSet) -> None:
        rows.prepared = kernel.PreparedRows.of(rows.raw, self.block_rows)

    def search(self, a: _LocalSet, b: _LocalSet, *, k: int, top_pairs: int = 0) -> kernel.SearchResult:
        assert a.prepared is not None and b.prepared is not None, "prepare both sets first"
        with _progress_bar(self.progress, a.n_rows, b.n_rows, self.block_rows) as bar:
            return kernel.search(a.prepared, b.prepared, k=k, block_rows=self.block_rows, top_pairs=top_pairs,
                                 band=metrics.DECISION_BAND, progress=bar)

    def exact_topk(self, queries: _LocalSet, rows: np.ndarray, reference: _LocalSet, k: int):
        blocks = ((start, reference.raw[start : start + self.block_rows])
                  for start in range(0, reference.n_rows, self.block_rows))
        scores, indices = kernel.exact_topk(queries.raw[torch.from_numpy(rows)], blocks, k)
        return scores.numpy(), indices.numpy()

    def rows(self, embeddings: _LocalSet, rows: np.ndarray) -> np.ndarray:
        return embeddings.raw[torch.from_numpy(np.asarray(rows, dtype=np.int64))].numpy()


class _RayEngine:
    """The search as Ray tasks: each set is a distributed.BlockSet in the object store."""

    def __init__(self, block_rows: int, progress: bool):
        from raymem.runtime import init_ray
        from raymem.search import distributed

        init_ray()
        self.distributed, self.block_rows, self.progress = distributed, block_rows, progress

    def put(self, batches: Iterable[np.ndarray], dim: int):
        return self.distributed.put_blocks(batches, self.block_rows, dim)

    def prepare(self, blocks) -> None:
        """Nothing to do here: each task prepares its blocks (raymem.search.distributed keeps them per worker)."""

    def search(self, a, b, *, k: int, top_pairs: int = 0) -> kernel.SearchResult:
        with _progress_bar(self.progress, a.n_rows, b.n_rows, self.block_rows) as bar:
            return self.distributed.search(a, b, k=k, top_pairs=top_pairs, band=metrics.DECISION_BAND, progress=bar)

    def exact_topk(self, queries, rows: np.ndarray, reference, k: int):
        scores, indices = self.distributed.exact_topk(self.rows(queries, rows), reference, k)
        return scores.numpy(), indices.numpy()

    def rows(self, blocks, rows: np.ndarray) -> np.ndarray:
        return self.distributed.take_rows(blocks, rows)


def _progress_bar(enabled: bool, n_a: int, n_b: int, block_rows: int):
    from tqdm import tqdm

    n_tiles = -(-n_a // block_rows) * -(-n_b // block_rows)
    return tqdm(total=n_tiles, unit="tile", disable=not enabled, desc=f"search {n_a} x {n_b}")


@dataclass
class Subset:
    """Rows (sorted indices) of one embedding source: the reference training set, a validation half, ..."""

    source: EmbeddingSource
    rows: np.ndarray

    @classmethod
    def whole(cls, source: EmbeddingSource) -> Subset:
        return cls(source, np.arange(len(source)))

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def sample_ids(self) -> np.ndarray:
        return self.source.sample_ids[self.rows]

    @property
    def patient_ids(self) -> np.ndarray | None:
        return None if self.source.patient_ids is None else self.source.patient_ids[self.rows]

    def batches(self) -> Iterator[np.ndarray]:
        return self.source.batches(rows=None if len(self.rows) == len(self.source) else self.rows)


@dataclass
class AuditInputs:
    """The audit's sets. train: the reference (the generator's own training set); calibrate: sets the thresholds
    (val); evaluate: measures the false-positive rates (test patients, else the validation half that does not
    calibrate: fpr_source "val-half"); synthetic: the generator's own samples; null: samples of a generator
    trained on held-out patients (optional)."""

    train: Subset
    calibrate: Subset
    evaluate: Subset
    synthetic: EmbeddingSource
    null: EmbeddingSource | None
    fpr_source: str
    reference: dict


@dataclass
class AuditResult:
    """What an audit found, for writing and for the report.

    metrics: the metrics.json dict. synthetic_top1 (n_synthetic,): each generated sample's best training score.
    null_scores (n_train,): each training sample's best validation score (the paper's null; tau is its percentile
    under calibration "paper"). null_scores_matched (n_val,): each validation sample's best training score (the
    matched copy null). null_scores_generator (n_null,) or None: each generator-null sample's best training score.
    top_pairs: the REPORT_PAIRS highest-scoring generated samples with their best training match (dicts:
    synthetic_id, train_id, patient_id, score, is_copy, synthetic_index, train_index). patients: per training
    patient rows (patient_id, n_train_images, n_memorized, best_score), riskiest first. matches: the matches table.
    phase_seconds: wall seconds of each phase run so far ({phase: seconds}, ``PhaseClock``; never in metrics, which
    one seed makes the same on every run); ``write_outputs`` adds "write".
    """

    metrics: dict
    synthetic_top1: np.ndarray
    null_scores: np.ndarray
    null_scores_matched: np.ndarray
    top_pairs: list[dict]
    patients: list[dict]
    matches: pa.Table
    null_scores_generator: np.ndarray | None = None
    phase_seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class Planted:
    """Known truth mixed in beside the generator's samples (never in its figures): embeddings (n, d), ids (n,),
    source (n,) the reference training row each known copy was made from, -1 for the known novel ones."""

    embeddings: np.ndarray
    ids: np.ndarray
    source: np.ndarray
    noise: float | None = None


def evaluation_split(val_patient_ids: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Without a test split: (calibrating rows, evaluating rows) of the validation set, split by patient."""
    return metrics.split_by_patient(val_patient_ids, np.random.default_rng(seed))


def read_inputs(train_uri: str, val_uri: str, synthetic_uri: str, *, test_uri: str | None, null_uri: str | None,
                reference_ids: Sequence[str] | None, seed: int) -> AuditInputs:
    """Open the sets, check the contracts (one embedding size; no patient in two of train, val, test), pick the
    reference training rows and the calibration / evaluation sets."""
    train = EmbeddingSource(train_uri, "train", require_patients=True)
    val = EmbeddingSource(val_uri, "val", require_patients=True)
    test = EmbeddingSource(test_uri, "test", require_patients=True) if test_uri else None
    synthetic = EmbeddingSource(synthetic_uri, "synthetic", require_patients=False)
    null = EmbeddingSource(null_uri, "generator-null", require_patients=False) if null_uri else None
    sources = [s for s in (train, val, test, synthetic, null) if s is not None]
    if len({s.dim for s in sources}) > 1:
        raise ValueError("embedding sizes differ: " + ", ".join(f"{s.role} {s.dim}" for s in sources)
                         + "; embed every set with the same detector")
    real = [s for s in (train, val, test) if s is not None]
    for i, first in enumerate(real):
        for second in real[i + 1:]:
            shared = np.intersect1d(first.patient_ids.astype(str), second.patient_ids.astype(str))
            if len(shared):
                raise ValueError(f"{second.role} patients must not appear in {first.role} (each role needs unseen "
                                 f"patients); shared patient_id: {', '.join(shared[:_MAX_NAMED])}")
    if reference_ids is None:
        train_rows, reference = np.arange(len(train)), {"source": "train split", "n_train": len(train)}
    else:
        row_of = {str(sample_id): i for i, sample_id in enumerate(train.sample_ids)}
        missing = [i for i in reference_ids if str(i) not in row_of]
        if missing:
            raise ValueError(f"the generator's training set names {len(missing)} sample ids that are not in the "
                             f"training embeddings {train_uri}: {', '.join(map(str, missing[:_MAX_NAMED]))}")
        train_rows = np.unique([row_of[str(i)] for i in reference_ids])
        reference = {"source": "the generator's training set", "n_train": len(train_rows),
                     "n_train_split": len(train)}
    if test is not None:
        calibrate, evaluate, fpr_source = Subset.whole(val), Subset.whole(test), "test"
    else:
        halves = evaluation_split(val.patient_ids, seed)
        calibrate, evaluate, fpr_source = Subset(val, halves[0]), Subset(val, halves[1]), "val-half"
    return AuditInputs(Subset(train, train_rows), calibrate, evaluate, synthetic, null, fpr_source, reference)


def plant_embeddings(engine, train_set, eval_set, n: int, rng: np.random.Generator) -> Planted:
    """n known copies (random reference training rows plus noise, PLANTED_NOISE) and n known novel samples
    (random evaluation rows under the same noise): the embedding-level ground truth."""
    copy_rows = np.sort(rng.choice(train_set.n_rows, size=n, replace=False))
    novel_rows = np.sort(rng.choice(eval_set.n_rows, size=n, replace=False))
    embeddings = np.concatenate([_plant(engine.rows(train_set, copy_rows), rng),
                                 _plant(engine.rows(eval_set, novel_rows), rng)])
    ids = np.array([f"planted-embedding-{i}" for i in range(n)] + [f"planted-novel-embedding-{i}" for i in range(n)],
                   dtype=object)
    return Planted(embeddings, ids, np.concatenate([copy_rows, np.full(n, -1)]), PLANTED_NOISE)


def read_planted(uri: str, planted: Mapping[str, str], planted_novel: Sequence[str],
                 train: Subset) -> Planted:
    """Known copies and known novel samples embedded at uri: planted {id: training sample_id it copies},
    planted_novel the ids of the known novel ones (every other planted sample is refused)."""
    source = EmbeddingSource(uri, "planted", require_patients=False)
    train_row = {str(sample_id): i for i, sample_id in enumerate(train.sample_ids)}
    ids = source.sample_ids.astype(str)
    unknown = sorted(set(ids) - set(planted) - set(planted_novel))
    missing = sorted((set(planted) | set(planted_novel)) - set(ids))
    outside = sorted({t for t in planted.values() if t not in train_row})
    for problem, names in (("are neither known copies nor known novel", unknown),
                           ("are listed but not embedded", missing),
                           ("copy training images outside the audited training set", outside)):
        if names:
            raise ValueError(f"planted samples at {uri} {problem}: {', '.join(names[:_MAX_NAMED])}")
    sources = np.array([train_row[planted[i]] if i in planted else -1 for i in ids], dtype=np.int64)
    return Planted(np.concatenate(list(source.batches())), source.sample_ids, sources)


class _Sets:
    """The audit's sets in the engine (tensors or Ray block sets) and the float64 pair recomputation."""

    def __init__(self, engine, inputs: AuditInputs):
        self.engine = engine
        self.train = engine.put(inputs.train.batches(), inputs.train.source.dim)
        self.calibrate = engine.put(inputs.calibrate.batches(), inputs.train.source.dim)
        self.evaluate = engine.put(inputs.evaluate.batches(), inputs.train.source.dim)
        self.synthetic = engine.put(inputs.synthetic.batches(), inputs.train.source.dim)
        self.null = engine.put(inputs.null.batches(), inputs.train.source.dim) if inputs.null else None

    def prepare(self) -> None:
        """Each set ready for the search (``engine.prepare``), once however often it is searched."""
        for rows in (self.train, self.calibrate, self.evaluate, self.synthetic, self.null):
            if rows is not None:
                self.engine.prepare(rows)

    def pair_recompute(self, other):
        """(train rows, rows of ``other``) -> float64 pair scores."""
        def recompute(train_rows: np.ndarray, other_rows: np.ndarray) -> np.ndarray:
            return kernel.exact_pair_scores(torch.from_numpy(self.engine.rows(self.train, train_rows)),
                                            torch.from_numpy(self.engine.rows(other, other_rows))).numpy()
        return recompute

    def top1(self, queries, reference):
        """Recompute of one query set's best match in a reference set."""
        return lambda rows: self.engine.exact_topk(queries, rows, reference, 1)


def search_against_train(sets: _Sets, other, n_other: int, n_train: int, top_pairs: int):
    """Training rows against another set: (train -> other best (n_train, 1), other -> train best (n_other, 1),
    the top_pairs largest pair scores (rows: train, cols: other))."""
    found = sets.engine.search(sets.train, other, k=1, top_pairs=top_pairs)
    return (
        metrics.Neighbours(found.row_scores.numpy(), found.row_indices.numpy(), sets.top1(sets.train, other)),
        metrics.Neighbours(found.col_scores.numpy()[:, None], found.col_indices.numpy()[:, None],
                           sets.top1(other, sets.train)),
        metrics.TopPairs.from_search(found.pair_scores.numpy(), found.pair_rows.numpy(), found.pair_cols.numpy(),
                                     n_train * n_other, top_pairs, sets.pair_recompute(other)),
    )


def pairs_above(sets: _Sets, other, n_other: int, n_train: int, threshold: float,
                pairs: metrics.TopPairs | None = None, first_request: int = 0):
    """(other -> train best, train x other pairs holding every pair strictly above threshold): searches for
    first_request pairs (at least 1024, and four times those already held), then again, asking for four times as
    many pairs each time, until the kept pairs reach below the threshold. The result does not depend on
    first_request; a good guess (``expected_pairs_above``) saves searches."""
    requested = max(1024, first_request, 4 * (len(pairs.scores) if pairs is not None else 0))
    best = None
    while pairs is None or not pairs.covers(threshold):
        _, best, pairs = search_against_train(sets, other, n_other, n_train, min(requested, n_train * n_other))
        requested *= 4
    return best, pairs


def expected_pairs_above(train_to_val: metrics.Neighbours, n_val: int, n_other: int, threshold: float) -> int:
    """About 1.5 times as many train x other pairs as score above threshold: ``pairs_above``'s first request.

    The share f of training samples whose best validation score exceeds the threshold gives the single-pair tail
    p with 1 - (1 - p) ** n_val = f (pairs taken as independent); train x other holds about p * n_train * n_other
    such pairs. The 1.5 covers the estimate's noise, so that one search mostly suffices; the search asks again
    when it does not.
    """
    share = float(np.mean(train_to_val.best > threshold))
    single_pair_tail = -np.expm1(np.log1p(-share) / n_val) if share < 1 else 1.0
    return int(np.ceil(1.5 * single_pair_tail * len(train_to_val) * n_other))


def run_audit(
    train_uri: str,
    val_uri: str,
    synthetic_uri: str,
    *,
    test_uri: str | None = None,
    null_uri: str | None = None,
    reference_ids: Sequence[str] | None = None,
    percentile: float = 95.0,
    top_k: int = 5,
    calibration: str = "paper",
    plant_copies: int = 0,
    planted_uri: str | None = None,
    planted: Mapping[str, str] | None = None,
    planted_novel: Sequence[str] = (),
    labels_csv: str | None = None,
    seed: int = 0,
    distributed: bool = False,
    block_rows: int = 4096,
    progress: bool = True,
) -> AuditResult:
    """Audit a generator's own samples (synthetic) against its own training set, with validation embeddings as
    the calibration null and test embeddings as the evaluation set.

    test_uri: held-out patients in neither train nor val; every measured false-positive rate and the planted
    negatives come from them. Without it the validation set is split by patient (evaluation_split): one half
    calibrates, the other evaluates (fpr_source "val-half"). null_uri: samples of a generator trained only on
    held-out patients: calibration "generator" and the false-positive rates under the generator's own shift.
    reference_ids: the generator's training sample_ids (its training_ids.json); None: the whole training set.
    percentile: P of the thresholds (paper: 95). top_k: training neighbours kept per synthetic sample.
    calibration: "paper", "matched" or "generator" (raymem.audit.metrics): which figures are the headline; all
    available ones are computed. plant_copies: N reference training embeddings plus noise (PLANTED_NOISE) as known
    copies and N evaluation embeddings under the same noise as known novel samples. planted_uri with planted
    {id: train sample_id} and planted_novel [ids]: known copies and known novel samples already embedded (the image
    audit's transformed images). Planted samples are searched and scored apart (metrics["planted"]); they never
    enter the generator's figures. labels_csv: hand labels (synthetic_id, train_id, label = copy|novel). seed: the
    validation split when there is no test split, the planted copies and the bootstraps. distributed: Ray tasks
    instead of this process. block_rows: the tile grid's block size.
    """
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    if calibration not in metrics.CALIBRATIONS:
        raise ValueError(f"calibration must be one of {metrics.CALIBRATIONS}, got {calibration!r}")
    if calibration == "generator" and not null_uri:
        raise ValueError("calibration 'generator' needs the samples of a generator trained on held-out patients "
                         "(--null-synthetic): train one with `raymem train-ldm --split test`")
    clock = PhaseClock()
    with clock.phase("read"):
        inputs = read_inputs(train_uri, val_uri, synthetic_uri, test_uri=test_uri, null_uri=null_uri,
                             reference_ids=reference_ids, seed=seed)
    n_train, n_synthetic = len(inputs.train), len(inputs.synthetic)
    if not 0 <= plant_copies <= min(n_train, len(inputs.evaluate)):
        raise ValueError(f"plant_copies must be between 0 and min({n_train} training, {len(inputs.evaluate)} "
                         f"evaluation samples), got {plant_copies}")
    rng = np.random.default_rng(seed)
    top_pairs = metrics.top_pairs_needed(n_train * len(inputs.calibrate), percentile, n_synthetic)
    if top_pairs > MAX_TOP_PAIRS:
        raise ValueError(f"the matched calibration's null for {n_synthetic} synthetic samples needs the "
                         f"{top_pairs:,} largest of {n_train:,} x {len(inputs.calibrate):,} train-validation "
                         f"correlations (more than {MAX_TOP_PAIRS:,}): audit more synthetic samples or use fewer "
                         "validation samples")

    engine = _RayEngine(block_rows, progress) if distributed else _LocalEngine(block_rows, progress)
    with clock.phase("read"):
        sets = _Sets(engine, inputs)
        planted_set = None
        if plant_copies:
            planted_set = plant_embeddings(engine, sets.train, sets.evaluate, plant_copies, rng)
        elif planted_uri:
            planted_set = read_planted(planted_uri, planted or {}, planted_novel, inputs.train)
    with clock.phase("standardise"):
        sets.prepare()
    with clock.phase("search"):
        searches, planted_to_train = _search(sets, inputs, percentile, top_k, top_pairs, planted_set)
    with clock.phase("calibrate"):
        names = [name for name in metrics.CALIBRATIONS if name != "generator" or inputs.null is not None]
        calibrations = {name: metrics.calibrate(name, searches, percentile) for name in names}
        chosen = calibrations[calibration]
    with clock.phase("figures"):
        figures = audit_metrics(inputs=inputs, searches=searches, calibrations=calibrations, chosen=chosen,
                                percentile=percentile, top_k=top_k)
        if planted_set is not None:
            figures["planted"] = planted_figures(planted_set, planted_to_train, chosen.threshold_copies, seed)
        if labels_csv is not None:
            figures["labels"] = _label_figures(labels_csv, inputs, sets, planted_set, chosen.threshold_copies)
        figures["n_scores_recomputed_float64"] = int(sum(
            part.exact.sum() for part in (searches.synthetic_to_train, searches.train_to_synthetic)))
        best_first = np.argsort(-searches.synthetic_to_train.best, kind="stable")[:REPORT_PAIRS]
        top_pairs_found = [_pair_row(i, inputs, searches.synthetic_to_train, chosen) for i in best_first]
        patients = metrics.patient_rows(inputs.train.patient_ids, chosen.is_memorized,
                                        searches.train_to_synthetic.best)
    with clock.phase("matches"):
        matches = matches_table(inputs=inputs, searches=searches, chosen=chosen, planted=planted_set,
                                planted_to_train=planted_to_train)
    return AuditResult(
        metrics=figures,
        synthetic_top1=searches.synthetic_to_train.best.copy(),
        null_scores=searches.train_to_val.best.copy(),
        null_scores_matched=searches.val_to_train.best.copy(),
        null_scores_generator=None if searches.null_to_train is None else searches.null_to_train.best.copy(),
        top_pairs=top_pairs_found,
        patients=patients,
        matches=matches,
        phase_seconds=clock.seconds,
    )


def _search(sets: _Sets, inputs: AuditInputs, percentile: float, top_k: int, top_pairs: int,
            planted: Planted | None) -> tuple[metrics.Searches, metrics.Neighbours | None]:
    """Every search the calibrations read, and the planted samples' training neighbours."""
    engine, n_train = sets.engine, len(inputs.train)
    train_to_val, val_to_train, val_pairs = search_against_train(sets, sets.calibrate, len(inputs.calibrate),
                                                                 n_train, top_pairs)
    found = engine.search(sets.synthetic, sets.train, k=top_k)
    searches = metrics.Searches(
        train_to_val=train_to_val, val_to_train=val_to_train, val_pairs=val_pairs,
        eval_to_train=None, eval_pairs=None,
        synthetic_to_train=metrics.Neighbours(found.row_scores.numpy(), found.row_indices.numpy(),
                                              lambda rows: engine.exact_topk(sets.synthetic, rows, sets.train, top_k)),
        train_to_synthetic=metrics.Neighbours(found.col_scores.numpy()[:, None], found.col_indices.numpy()[:, None],
                                              sets.top1(sets.train, sets.synthetic)),
        train_patient_ids=inputs.train.patient_ids, eval_patient_ids=inputs.evaluate.patient_ids,
    )
    if inputs.null is not None:
        n_null = len(inputs.null)
        null_pairs = metrics.top_pairs_needed(n_train * n_null, percentile, searches.n_synthetic)
        _, searches.null_to_train, searches.null_pairs = search_against_train(sets, sets.null, n_null, n_train,
                                                                              null_pairs)
    # The evaluation and null pairs must hold every pair above the lowest memorized threshold in use.
    lowest = min(metrics.thresholds(name, searches, percentile)[1] for name in metrics.CALIBRATIONS
                 if name != "generator" or inputs.null is not None)
    def expected(n_other: int) -> int:
        return expected_pairs_above(searches.train_to_val, len(inputs.calibrate), n_other, lowest)

    searches.eval_to_train, searches.eval_pairs = pairs_above(sets, sets.evaluate, len(inputs.evaluate), n_train,
                                                              lowest, first_request=expected(len(inputs.evaluate)))
    if inputs.null is not None and not searches.null_pairs.covers(lowest):
        _, searches.null_pairs = pairs_above(sets, sets.null, len(inputs.null), n_train, lowest,
                                             searches.null_pairs, first_request=expected(len(inputs.null)))
    planted_to_train = None
    if planted is not None:
        planted_blocks = engine.put([planted.embeddings], planted.embeddings.shape[1])
        engine.prepare(planted_blocks)
        found = engine.search(planted_blocks, sets.train, k=top_k)
        planted_to_train = metrics.Neighbours(
            found.row_scores.numpy(), found.row_indices.numpy(),
            lambda rows: engine.exact_topk(planted_blocks, rows, sets.train, top_k))
    return searches, planted_to_train


def planted_figures(planted: Planted, planted_to_train: metrics.Neighbours, threshold: float, seed: int) -> dict:
    """The planted ground truth at the copy threshold in use: sensitivity on the known copies, specificity on the
    known novel samples, precision, ROC AUC, with 95 % intervals; and how often a copy's best match is its source."""
    is_copy = planted.source >= 0
    figures = metrics.detection_figures(is_copy, planted_to_train.exceeds(threshold), planted_to_train.best, seed)
    return {
        "n_copies": int(is_copy.sum()),
        "n_novel": int((~is_copy).sum()),
        **figures,
        "embedding_noise": planted.noise,
        "source_top1_rate": float((planted_to_train.best_index == planted.source)[is_copy].mean())
        if is_copy.any() else None,
    }


def _pair_row(i: int, inputs: AuditInputs, synthetic_to_train, chosen) -> dict:
    """A generated sample and its best training match, for the report."""
    j = int(synthetic_to_train.best_index[i])
    return {"synthetic_id": str(inputs.synthetic.sample_ids[i]), "train_id": str(inputs.train.sample_ids[j]),
            "patient_id": str(inputs.train.patient_ids[j]), "score": float(synthetic_to_train.best[i]),
            "is_copy": bool(chosen.is_copy[i]), "synthetic_index": int(i), "train_index": j}


def _plant(train_rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Known copies (r, d): each row plus Gaussian noise of PLANTED_NOISE times the row's own std."""
    rows = train_rows.astype(np.float64)
    noise = rng.standard_normal(rows.shape) * PLANTED_NOISE * rows.std(axis=1, keepdims=True)
    return (rows + noise).astype(np.float32)


def audit_metrics(*, inputs: AuditInputs, searches: metrics.Searches, calibrations: dict, chosen, percentile: float,
                  top_k: int) -> dict:
    """The metrics.json dict (DESIGN.md contract keys): the chosen calibration's figures of the generator's own
    samples against its own training set, with their 95 % intervals, the false-positive rates measured on the
    evaluation set at the thresholds in use, every calibration's figures, score distributions, warnings."""
    headline = chosen.figures()
    n_eval_patients = len(np.unique(inputs.evaluate.patient_ids.astype(str)))
    n_val_patients = len(np.unique(inputs.calibrate.patient_ids.astype(str)))
    figures = {
        "threshold": calibrations["paper"].threshold_copies,
        "threshold_copies": chosen.threshold_copies,
        "threshold_memorized": chosen.threshold_memorized,
        "percentile": percentile,
        "calibration": chosen.name,
        "top_k": top_k,
        "n_train": len(inputs.train),
        "n_val": len(inputs.calibrate),
        "n_synthetic": len(inputs.synthetic),
        "n_patients": len(chosen.is_memorized_patient),
        "n_eval": len(inputs.evaluate),
        "n_eval_patients": n_eval_patients,
        "fpr_source": inputs.fpr_source,
        "reference": inputs.reference,
    }
    if inputs.null is not None:
        figures["n_null"] = len(inputs.null)
    figures.update({key: value for key, value in headline.items() if key not in ("threshold_copies",
                                                                                   "threshold_memorized")})
    figures["implied_fpr"] = chosen.implied_fpr_copies
    figures["calibrations"] = {name: calibration.figures() for name, calibration in calibrations.items()}
    figures["distribution"] = {
        "synthetic_top1": metrics.summary(searches.synthetic_to_train.best),
        "null_train_to_val": metrics.summary(searches.train_to_val.best),
        "null_val_to_train": metrics.summary(searches.val_to_train.best),
        "eval_to_train": metrics.summary(searches.eval_to_train.best),
    }
    if searches.null_to_train is not None:
        figures["distribution"]["generator_null_to_train"] = metrics.summary(searches.null_to_train.best)
    if inputs.fpr_source == "val-half":
        figures["validation_split"] = {"n_val": [len(inputs.calibrate), len(inputs.evaluate)],
                                       "n_patients": [n_val_patients, n_eval_patients]}
    largest_eval_patient = int(np.unique(inputs.evaluate.patient_ids.astype(str), return_counts=True)[1].max())
    figures["warnings"] = audit_warnings(figures, n_val_patients, len(inputs.evaluate) - largest_eval_patient)
    return figures


def audit_warnings(figures: dict, n_val_patients: int, measurable_draws: int) -> list[str]:
    """What a reader must know before trusting the figures: small evaluation or calibration sets, no test split,
    few generated samples, a memorized false-positive rate carried far beyond the draws the evaluation set can
    measure (measurable_draws: n_eval - its largest patient, raymem.audit.statistics.memorized_rate_interval)."""
    warnings = []
    minimum = statistics.MIN_EVAL_PATIENTS
    if figures["fpr_source"] == "val-half":
        warnings.append("no test split: the false-positive rates are measured on half of the validation patients, "
                        "and the other half alone sets the thresholds")
    if figures["n_eval_patients"] < minimum:
        warnings.append(f"only {figures['n_eval_patients']} evaluation patients (fewer than {minimum}): the measured "
                        "false-positive rates are too uncertain to state; see their 95 % intervals")
    if n_val_patients < minimum:
        warnings.append(f"only {n_val_patients} calibration (val) patients (fewer than {minimum}): the thresholds "
                        "are extreme order statistics of few values and their false-positive rates vary widely")
    if figures["calibration"] == "paper" and figures["n_train"] < MIN_PAPER_NULL:
        warnings.append(f"the paper's tau is a percentile of only {figures['n_train']} values (one per training "
                        "image): it moves a lot between training sets; calibration 'matched' takes one value per "
                        "validation image")
    if figures["n_synthetic"] > MAX_BRACKET * measurable_draws:
        warnings.append(f"the evaluation set measures the memorized false-positive rate at {measurable_draws} draws; "
                        f"for {figures['n_synthetic']} generated samples it is carried up by an upper bound, so it "
                        "reads high: more test patients make it tighter")
    if figures["n_synthetic"] < MIN_GENERATED:
        warnings.append(f"only {figures['n_synthetic']} generated samples: the intervals of the memorized shares "
                        "rest on a two-way clustering approximation that covers less than 95 % this small "
                        "(docs/statistics.md)")
    if figures["n_synthetic"] < figures["n_train"]:
        warnings.append(f"{figures['n_synthetic']} generated samples for {figures['n_train']} training images: "
                        "fewer than the paper's rule (n_synthetic >= n_train), so the memorized share cannot reach "
                        "100 %")
    return warnings


def _label_figures(labels_csv, inputs: AuditInputs, sets: _Sets, planted: Planted | None, threshold) -> dict:
    """Agreement of the audit with hand labels: CSV columns synthetic_id, train_id, label (copy or novel). A
    synthetic_id names a generated sample or a planted one."""
    text = storage.read_bytes(labels_csv).decode("utf-8")
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows or not {"synthetic_id", "train_id", "label"} <= set(rows[0]):
        raise ValueError(f"labels {labels_csv}: need a header with synthetic_id, train_id, label and at least one row")
    labels = [row["label"].strip().lower() for row in rows]
    unknown_labels = sorted(set(labels) - {"copy", "novel"})
    if unknown_labels:
        raise ValueError(f"labels {labels_csv}: label must be 'copy' or 'novel', found {unknown_labels}")
    synthetic_index = {str(sample_id): i for i, sample_id in enumerate(inputs.synthetic.sample_ids)}
    planted_index = {} if planted is None else {str(sample_id): i for i, sample_id in enumerate(planted.ids)}
    train_index = {str(sample_id): i for i, sample_id in enumerate(inputs.train.sample_ids)}
    missing = [row["synthetic_id"] for row in rows if row["synthetic_id"] not in synthetic_index
               and row["synthetic_id"] not in planted_index]
    missing += [row["train_id"] for row in rows if row["train_id"] not in train_index]
    if missing:
        raise ValueError(f"labels {labels_csv}: sample ids not in the audited sets: {', '.join(missing[:_MAX_NAMED])}")
    queries = np.stack([sets.engine.rows(sets.synthetic, [synthetic_index[row["synthetic_id"]]])[0]
                        if row["synthetic_id"] in synthetic_index else planted.embeddings[planted_index[row["synthetic_id"]]]
                        for row in rows])
    train_rows = np.array([train_index[row["train_id"]] for row in rows])
    scores = kernel.exact_pair_scores(torch.from_numpy(queries),
                                      torch.from_numpy(sets.engine.rows(sets.train, train_rows))).numpy()
    return metrics.label_agreement(np.array(labels) == "copy", scores, threshold)


def matches_table(*, inputs: AuditInputs, searches: metrics.Searches, chosen, planted: Planted | None,
                  planted_to_train: metrics.Neighbours | None) -> pa.Table:
    """The matches.parquet table (layout in the module docstring)."""
    train_ids, synthetic_ids = inputs.train.sample_ids, inputs.synthetic.sample_ids

    def part(kind, ids, patients, neighbours, neighbour_ids, is_copy=None, is_memorized=None, planted_from=None):
        n = len(ids)
        return pa.table({
            "kind": pa.array(np.full(n, kind), pa.string()),
            "sample_id": pa.array(ids.astype(str), pa.string()),
            "patient_id": pa.nulls(n, pa.string()) if patients is None else pa.array(patients, pa.string()),
            "neighbour_ids": _lists(neighbour_ids[neighbours.indices].astype(str), pa.string()),
            "neighbour_indices": _lists(neighbours.indices, pa.int64()),
            "neighbour_scores": _lists(neighbours.scores, pa.float64()),
            "best_score": pa.array(neighbours.best, pa.float64()),
            "score_exact": pa.array(neighbours.exact, pa.bool_()),
            "is_copy": pa.nulls(n, pa.bool_()) if is_copy is None else pa.array(is_copy, pa.bool_()),
            "is_memorized": pa.nulls(n, pa.bool_()) if is_memorized is None else pa.array(is_memorized, pa.bool_()),
            "planted_from": pa.nulls(n, pa.string()) if planted_from is None else pa.array(planted_from, pa.string()),
        })

    parts = [
        part("synthetic", synthetic_ids, inputs.synthetic.patient_ids, searches.synthetic_to_train, train_ids,
             is_copy=chosen.is_copy),
        part("train", train_ids, inputs.train.patient_ids, searches.train_to_synthetic, synthetic_ids,
             is_memorized=chosen.is_memorized),
    ]
    if planted is not None:
        planted_from = [str(train_ids[s]) if s >= 0 else None for s in planted.source]
        parts.append(part("planted", planted.ids, None, planted_to_train, train_ids,
                          is_copy=planted_to_train.exceeds(chosen.threshold_copies), planted_from=planted_from))
    return pa.concat_tables(parts)


def _lists(values: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    """An (n, k) array as an Arrow list<value_type> column of n lists of k values, built from the flat values
    (a list of Python lists per row costs some ten times more at 100,000 rows)."""
    n, k = values.shape
    assert n * k < 2**31, values.shape  # list offsets are int32
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32) if k else np.zeros(n + 1, np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), value_type))


def write_outputs(result: AuditResult, out_uri: str) -> None:
    """metrics.json and matches.parquet under out_uri (local or s3://); the seconds it took are the result's
    "write" phase."""
    started = time.perf_counter()
    storage.write_bytes(storage.join(out_uri, "metrics.json"), json.dumps(result.metrics, indent=2).encode())
    buffer = io.BytesIO()
    pq.write_table(result.matches, buffer)
    storage.write_bytes(storage.join(out_uri, "matches.parquet"), buffer.getvalue())
    result.phase_seconds["write"] = result.phase_seconds.get("write", 0.0) + time.perf_counter() - started


def numeric_items(metrics: dict, prefix: str = "") -> Iterable[tuple[str, float]]:
    """(name, value) of every finite number in a metrics dict, nested keys joined by dots; a ``ci95`` entry
    {figure: [lo, hi]} becomes <figure>_ci_lo and <figure>_ci_hi (MLflow metric names)."""
    for key, value in metrics.items():
        if key == "ci95" and isinstance(value, dict):
            for figure, (lo, hi) in value.items():
                yield f"{prefix}{figure}_ci_lo", float(lo)
                yield f"{prefix}{figure}_ci_hi", float(hi)
        elif isinstance(value, dict):
            yield from numeric_items(value, f"{prefix}{key}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value):
            yield f"{prefix}{key}", float(value)


def track_audit(result: AuditResult, out_uri: str, *, experiment: str, run_name: str, params: dict,
                artifacts: Mapping[str, str] = (), stage: str = "audit") -> None:
    """One MLflow run per audit (MLFLOW_TRACKING_URI, else sqlite in a local out_uri): params, every numeric
    figure (intervals as <figure>_ci_lo / _ci_hi), each phase's wall seconds as audit/phase_seconds/<phase>, the
    warnings, the evaluation source and the training set compared with as tags; metrics.json and ``artifacts``
    ({file name: text}) as artifacts, under <out_uri>/mlartifacts when the audit creates the experiment (as
    train-ldm and sweeps do; MLflow's default would be ./mlruns in whatever folder the job runs in)."""
    from raymem import tracking

    metrics = result.metrics
    uri = tracking.tracking_uri() if storage.is_s3(out_uri) else tracking.tracking_uri(out_uri)
    tags = {"raymem.stage": stage, "raymem.fpr_source": str(metrics.get("fpr_source")),
            "raymem.reference": str(metrics.get("reference", {}).get("source"))}
    if metrics.get("warnings"):
        tags["raymem.warnings"] = " | ".join(metrics["warnings"])[:5000]  # MLflow caps a tag value's length
    with tracking.run(experiment, run_name, uri=uri, artifact_location=tracking.artifact_root(out_uri),
                      tags=tags) as tracked:
        tracking.log_params(tracked, params)
        tracking.log_metrics(tracked, {**dict(numeric_items(metrics)), **{
            f"audit/phase_seconds/{phase}": seconds for phase, seconds in result.phase_seconds.items()}})
        files = {**dict(artifacts), "metrics.json": json.dumps(metrics, indent=2, sort_keys=True)}
        with tempfile.TemporaryDirectory() as folder:
            for name, text in files.items():
                Path(folder, name).write_text(text, encoding="utf-8")
            tracked.client.log_artifacts(tracked.run_id, folder)


def audit_embeddings(train_uri: str, val_uri: str, synthetic_uri: str, out_uri: str, **options) -> AuditResult:
    """Run the audit (``run_audit``, same keywords) and write metrics.json and matches.parquet under out_uri;
    returns the result (its phase_seconds with "write")."""
    result = run_audit(train_uri, val_uri, synthetic_uri, **options)
    write_outputs(result, out_uri)
    return result
