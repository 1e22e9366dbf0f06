"""The memorization audit on embeddings: read three embedding sets, search, decide, write the results.

Inputs follow the embedding schema of DESIGN.md: Parquet with ``sample_id`` (string), ``patient_id`` (string;
required for training and validation, optional for synthetic samples) and ``embedding`` (fixed_size_list<float32>[d]
or a variable list of length d), at a URI naming a file or a folder of ``*.parquet`` files (local path or s3://).

Outputs under ``out_uri``:

- ``metrics.json``: the figures of raymem.audit.metrics (keys listed in ``audit_metrics``).
- ``matches.parquet``: one row per synthetic sample (``kind`` = "synthetic") followed by one row per training
  sample (``kind`` = "train"). Columns: kind, sample_id, patient_id, neighbour_ids, neighbour_indices,
  neighbour_scores (lists, best first: a synthetic sample's top-k training samples, a training sample's best
  synthetic sample), best_score, score_exact (the row was recomputed in float64 because a decision was near a
  threshold), is_copy (synthetic rows; null on training rows), is_memorized (training rows; null on synthetic rows),
  planted_from (the training sample_id a planted copy was made from; null otherwise). Indices count rows of the
  training set (synthetic rows) or of the synthetic set with planted copies appended (training rows), in input order.

This module reads, orchestrates and writes; thresholds and figures are computed in raymem.audit.metrics and the
search in raymem.search (single process, or Ray tasks with ``distributed=True``).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from raymem import storage
from raymem.audit import metrics
from raymem.search import kernel

PLANTED_NOISE = 0.1  # planted copy = training embedding + N(0, (PLANTED_NOISE * the embedding's std)^2) per entry
REPORT_PAIRS = 24  # highest-scoring synthetic/training pairs handed to the report
MAX_TOP_PAIRS = 1 << 25  # largest train x validation scores the matched null may need (~0.7 GiB on the driver)
READ_BATCH_ROWS = 8192
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
            for batch in self._open(file_uri).iter_batches(batch_size=batch_rows, columns=["embedding"]):
                stop = start + batch.num_rows
                wanted = None if rows is None else rows[(rows >= start) & (rows < stop)] - start
                column = batch.column(0)
                if wanted is not None:
                    column = column.take(pa.array(wanted))
                ids = self.sample_ids[start:stop] if wanted is None else self.sample_ids[start:stop][wanted]
                yield self._matrix(column, ids)
                start = stop

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


class _LocalEngine:
    """The search in this process: each set is one tensor (n, d) in memory."""

    def __init__(self, block_rows: int, progress: bool):
        self.block_rows, self.progress = block_rows, progress

    def put(self, batches: Iterable[np.ndarray], dim: int) -> torch.Tensor:
        return torch.from_numpy(np.concatenate([np.zeros((0, dim), np.float32), *batches]))  # (0, d) if no rows

    def search(self, a: torch.Tensor, b: torch.Tensor, *, k: int, top_pairs: int = 0) -> kernel.SearchResult:
        with _progress_bar(self.progress, len(a), len(b), self.block_rows) as bar:
            return kernel.search(a, b, k=k, block_rows=self.block_rows, top_pairs=top_pairs,
                                 band=metrics.DECISION_BAND, progress=bar)

    def exact_topk(self, queries: torch.Tensor, rows: np.ndarray, reference: torch.Tensor, k: int):
        blocks = ((start, reference[start : start + self.block_rows]) for start in range(0, len(reference), self.block_rows))
        scores, indices = kernel.exact_topk(queries[torch.from_numpy(rows)], blocks, k)
        return scores.numpy(), indices.numpy()

    def rows(self, embeddings: torch.Tensor, rows: np.ndarray) -> np.ndarray:
        return embeddings[torch.from_numpy(np.asarray(rows, dtype=np.int64))].numpy()


class _RayEngine:
    """The search as Ray tasks: each set is a distributed.BlockSet in the object store."""

    def __init__(self, block_rows: int, progress: bool):
        from raymem.runtime import init_ray
        from raymem.search import distributed

        init_ray()
        self.distributed, self.block_rows, self.progress = distributed, block_rows, progress

    def put(self, batches: Iterable[np.ndarray], dim: int):
        return self.distributed.put_blocks(batches, self.block_rows, dim)

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
class AuditResult:
    """What an audit found, for writing and for the report.

    metrics: the metrics.json dict. synthetic_top1 (n_synthetic,): each synthetic sample's best training score.
    null_scores (n_train,): each training sample's best validation score (the paper's null; tau is its percentile
    under calibration "paper"). null_scores_matched (n_val,): each validation sample's best training score (the
    matched copy null). top_pairs: the REPORT_PAIRS highest-scoring synthetic samples with their best training match
    (dicts: synthetic_id, train_id, patient_id, score, is_copy, synthetic_index, train_index). patients: per training
    patient rows (patient_id, n_train_images, n_memorized, best_score), riskiest first. matches: the matches table.
    """

    metrics: dict
    synthetic_top1: np.ndarray
    null_scores: np.ndarray
    null_scores_matched: np.ndarray
    top_pairs: list[dict]
    patients: list[dict]
    matches: pa.Table


def run_audit(
    train_uri: str,
    val_uri: str,
    synthetic_uri: str,
    *,
    percentile: float = 95.0,
    top_k: int = 5,
    calibration: str = "paper",
    plant_copies: int = 0,
    planted: Mapping[str, str] | None = None,
    planted_novel: Sequence[str] = (),
    labels_csv: str | None = None,
    seed: int = 0,
    distributed: bool = False,
    block_rows: int = 4096,
    progress: bool = True,
) -> AuditResult:
    """Audit synthetic embeddings against training embeddings, with validation embeddings as the null.

    percentile: P of the threshold (paper: 95). top_k: training neighbours kept per synthetic sample.
    calibration: "paper" or "matched" (raymem.audit.metrics), which figures are the headline; both are computed.
    plant_copies: N training embeddings, each plus noise (PLANTED_NOISE), appended to the synthetic set (ids
    "planted-embedding-<i>") as known copies. planted: {synthetic_id: train_id} of synthetic samples already in the
    set that are known copies (the image audit plants transformed images). With either, the copy decisions are
    scored against that truth: every other synthetic sample counts as novel, unless planted_novel names the known
    novel ones (transformed images of held-out patients), which are then the only negatives, so a generator's own
    copies do not count as false alarms. labels_csv: hand labels (columns
    synthetic_id, train_id, label = copy|novel). seed: numpy.random.default_rng(seed) draws the validation split
    (metrics.split_by_patient), then the planted copies. distributed: Ray tasks instead of this process.
    block_rows: the tile grid's block size.
    """
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    if calibration not in metrics.CALIBRATIONS:
        raise ValueError(f"calibration must be one of {metrics.CALIBRATIONS}, got {calibration!r}")
    train = EmbeddingSource(train_uri, "train", require_patients=True)
    val = EmbeddingSource(val_uri, "val", require_patients=True)
    synthetic = EmbeddingSource(synthetic_uri, "synthetic", require_patients=False)
    if len({train.dim, val.dim, synthetic.dim}) > 1:
        raise ValueError(f"embedding sizes differ: train {train.dim}, val {val.dim}, synthetic {synthetic.dim}; "
                         "embed all three sets with the same detector")
    shared = np.intersect1d(train.patient_ids.astype(str), val.patient_ids.astype(str))
    if len(shared):
        raise ValueError(f"validation patients must not appear in training (the null needs unseen patients); "
                         f"shared patient_id: {', '.join(shared[:_MAX_NAMED])}")
    if not 0 <= plant_copies <= len(train):
        raise ValueError(f"plant_copies must be between 0 and the {len(train)} training samples, got {plant_copies}")
    rng = np.random.default_rng(seed)
    halves = metrics.split_by_patient(val.patient_ids, rng)
    planted_rows = np.sort(rng.choice(len(train), size=plant_copies, replace=False))
    synthetic_ids = np.concatenate([synthetic.sample_ids, [f"planted-embedding-{i}" for i in range(plant_copies)]])
    _require_unique(synthetic_ids, "synthetic sample_id (with planted copies)", synthetic_uri)
    planted_source = _planted_sources(planted or {}, synthetic_ids, train.sample_ids)
    unknown_novel = sorted(set(planted_novel) - set(synthetic_ids.astype(str)))
    if unknown_novel:
        raise ValueError(f"planted novel samples not in the synthetic set: {', '.join(unknown_novel[:_MAX_NAMED])}")
    planted_source[len(synthetic):] = planted_rows
    n_train, n_val, n_synthetic = len(train), len(val), len(synthetic_ids)
    top_pairs = [max(metrics.top_pairs_needed(n_train * n_val, percentile, n_synthetic),
                     metrics.top_pairs_needed(n_train * len(half), percentile, len(other)))
                 for half, other in (halves, halves[::-1])]
    if max(top_pairs) > MAX_TOP_PAIRS:
        raise ValueError(f"the matched calibration's null for {n_synthetic} synthetic samples needs the "
                         f"{max(top_pairs):,} largest of {n_train:,} x {n_val:,} train-validation correlations "
                         f"(more than {MAX_TOP_PAIRS:,}): audit more synthetic samples or use fewer validation samples")

    engine = _RayEngine(block_rows, progress) if distributed else _LocalEngine(block_rows, progress)
    train_set = engine.put(train.batches(), train.dim)
    planted_embeddings = _plant(engine.rows(train_set, planted_rows), rng)
    synthetic_set = engine.put(chain(synthetic.batches(), [planted_embeddings]), train.dim)
    half_sets = [engine.put(val.batches(rows=half), val.dim) for half in halves]

    def pair_scores(train_rows: np.ndarray, val_rows: np.ndarray) -> np.ndarray:
        """Float64 correlations of (train row, validation row) pairs, validation rows in the whole set's order."""
        val_raw = np.empty((len(val_rows), val.dim), np.float32)
        for half, half_set in zip(halves, half_sets):
            mine = np.isin(val_rows, half)
            val_raw[mine] = engine.rows(half_set, np.searchsorted(half, val_rows[mine]))
        train_raw = engine.rows(train_set, train_rows)
        return kernel.exact_pair_scores(torch.from_numpy(train_raw), torch.from_numpy(val_raw)).numpy()

    nulls = [_null_search(engine, train_set, half, half_set, top, pair_scores)
             for half, half_set, top in zip(halves, half_sets, top_pairs)]
    found = engine.search(synthetic_set, train_set, k=top_k)
    synthetic_to_train = metrics.Neighbours(
        found.row_scores.numpy(), found.row_indices.numpy(),
        lambda rows: engine.exact_topk(synthetic_set, rows, train_set, top_k),
    )
    train_to_synthetic = metrics.Neighbours(
        found.col_scores.numpy()[:, None], found.col_indices.numpy()[:, None],
        lambda rows: engine.exact_topk(train_set, rows, synthetic_set, 1),
    )
    calibrations = {
        name: metrics.calibrate(name, halves=nulls, synthetic_to_train=synthetic_to_train,
                                train_to_synthetic=train_to_synthetic, train_patient_ids=train.patient_ids,
                                percentile=percentile)
        for name in metrics.CALIBRATIONS
    }
    chosen = calibrations[calibration]
    paper_null = metrics.best_of(nulls[0].train_to_val, nulls[1].train_to_val)
    matched_null = metrics.concatenate([null.val_to_train for null in nulls])
    figures = audit_metrics(
        chosen=chosen, calibrations=calibrations, percentile=percentile, top_k=top_k, n_val=n_val, halves=halves,
        val_patient_ids=val.patient_ids, synthetic_top1=synthetic_to_train.best, paper_null=paper_null.best,
        matched_null=matched_null.best, n_exact=int(synthetic_to_train.exact.sum() + train_to_synthetic.exact.sum()),
    )
    is_planted = planted_source >= 0
    if is_planted.any():
        known = is_planted | np.isin(synthetic_ids.astype(str), np.asarray(planted_novel, dtype=str)) \
            if len(planted_novel) else np.ones(len(synthetic_ids), dtype=bool)
        figures.update(metrics.detection_figures(is_planted[known], chosen.is_copy[known],
                                                 synthetic_to_train.best[known]))
        figures["planted_copies"] = {
            "n": int(is_planted.sum()),
            "embedding_noise": PLANTED_NOISE if plant_copies else None,
            "source_top1_rate": float((synthetic_to_train.best_index == planted_source)[is_planted].mean()),
        }
    if labels_csv is not None:
        figures["labels"] = _label_figures(labels_csv, synthetic_ids, train.sample_ids, synthetic_set, train_set,
                                           engine, chosen.threshold_copies)
    synthetic_patients = (synthetic.patient_ids if synthetic.patient_ids is not None
                          else np.full(len(synthetic), None, dtype=object))
    matches = matches_table(
        synthetic_ids=synthetic_ids,
        synthetic_patient_ids=np.concatenate([synthetic_patients, np.full(plant_copies, None, dtype=object)]),
        train_ids=train.sample_ids,
        train_patient_ids=train.patient_ids,
        synthetic_to_train=synthetic_to_train,
        train_to_synthetic=train_to_synthetic,
        chosen=chosen,
        planted_from=np.where(is_planted, train.sample_ids[np.maximum(planted_source, 0)], None),
    )
    best_first = np.argsort(-synthetic_to_train.best, kind="stable")[:REPORT_PAIRS]
    return AuditResult(
        metrics=figures,
        synthetic_top1=synthetic_to_train.best.copy(),
        null_scores=paper_null.best.copy(),
        null_scores_matched=matched_null.best.copy(),
        top_pairs=[_pair_row(i, synthetic_ids, train, synthetic_to_train, chosen) for i in best_first],
        patients=metrics.patient_rows(train.patient_ids, chosen.is_memorized, train_to_synthetic.best),
        matches=matches,
    )


def _null_search(engine, train_set, half: np.ndarray, half_set, top_pairs: int, pair_scores) -> metrics.NullSearch:
    """Training samples against one validation half (rows ``half`` of the validation set): both directions and
    the largest pair scores, with validation indices in the whole set's order."""
    found = engine.search(train_set, half_set, k=1, top_pairs=top_pairs)
    return metrics.NullSearch(
        train_to_val=metrics.Neighbours(
            found.row_scores.numpy(), half[found.row_indices.numpy()],
            _mapped(lambda rows: engine.exact_topk(train_set, rows, half_set, 1), half),
        ),
        val_to_train=metrics.Neighbours(
            found.col_scores.numpy()[:, None], found.col_indices.numpy()[:, None],
            lambda rows: engine.exact_topk(half_set, rows, train_set, 1),
        ),
        pairs=metrics.TopPairs(found.pair_scores.numpy(), found.pair_rows.numpy(), half[found.pair_cols.numpy()],
                               len(found.row_scores) * len(half), pair_scores),
    )


def _pair_row(i: int, synthetic_ids: np.ndarray, train: EmbeddingSource, synthetic_to_train, chosen) -> dict:
    """A synthetic sample and its best training match, for the report."""
    j = int(synthetic_to_train.best_index[i])
    return {"synthetic_id": str(synthetic_ids[i]), "train_id": str(train.sample_ids[j]),
            "patient_id": str(train.patient_ids[j]), "score": float(synthetic_to_train.best[i]),
            "is_copy": bool(chosen.is_copy[i]), "synthetic_index": int(i), "train_index": j}


def _mapped(recompute, half: np.ndarray):
    """A recompute over one validation half, with indices mapped to the whole validation set."""

    def mapped(rows):
        scores, indices = recompute(rows)
        return scores, half[indices]

    return mapped


def _planted_sources(planted: Mapping[str, str], synthetic_ids: np.ndarray, train_ids: np.ndarray) -> np.ndarray:
    """(n_synthetic,) the training row each known copy was made from, -1 for the other synthetic samples."""
    synthetic_row = {str(sample_id): i for i, sample_id in enumerate(synthetic_ids)}
    train_row = {str(sample_id): i for i, sample_id in enumerate(train_ids)}
    missing = [i for i in planted if i not in synthetic_row] + [t for t in planted.values() if t not in train_row]
    if missing:
        raise ValueError(f"planted copies name sample ids that are not in the audited sets: "
                         f"{', '.join(missing[:_MAX_NAMED])}")
    sources = np.full(len(synthetic_ids), -1, dtype=np.int64)
    for synthetic_id, train_id in planted.items():
        sources[synthetic_row[synthetic_id]] = train_row[train_id]
    return sources


def _plant(train_rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Known copies (r, d): each training row plus Gaussian noise of PLANTED_NOISE times the row's own std."""
    rows = train_rows.astype(np.float64)
    noise = rng.standard_normal(rows.shape) * PLANTED_NOISE * rows.std(axis=1, keepdims=True)
    return (rows + noise).astype(np.float32)


def audit_metrics(*, chosen, calibrations, percentile, top_k, n_val, halves, val_patient_ids, synthetic_top1,
                  paper_null, matched_null, n_exact) -> dict:
    """The metrics.json dict: the headline figures of the chosen calibration (DESIGN.md contract keys), both
    calibrations' figures, the score distributions next to their nulls, the validation split."""
    headline = chosen.figures()
    n_train, n_synthetic = len(chosen.is_memorized), len(chosen.is_copy)
    return {
        "threshold": chosen.threshold_copies,
        "threshold_copies": chosen.threshold_copies,
        "threshold_memorized": chosen.threshold_memorized,
        "percentile": percentile,
        "calibration": chosen.name,
        "top_k": top_k,
        "n_train": n_train,
        "n_val": n_val,
        "n_synthetic": n_synthetic,
        "n_memorized_train": headline["n_memorized_train"],
        "pct_memorized_train": headline["pct_memorized_train"],
        "n_copies": headline["n_copies"],
        "pct_copies": headline["pct_copies"],
        "n_patients": len(chosen.is_memorized_patient),
        "n_memorized_patients": headline["n_memorized_patients"],
        "pct_memorized_patients": headline["pct_memorized_patients"],
        "implied_fpr": chosen.implied_fpr_copies,
        "measured_fpr_copies": chosen.measured_fpr_copies,
        "measured_fpr_memorized": chosen.measured_fpr_memorized,
        "calibrations": {name: calibration.figures() for name, calibration in calibrations.items()},
        "distribution": {
            "synthetic_top1": metrics.summary(synthetic_top1),
            "null_train_to_val": metrics.summary(paper_null),
            "null_val_to_train": metrics.summary(matched_null),
        },
        "validation_split": {
            "n_val": [len(half) for half in halves],
            "n_patients": [len(np.unique(val_patient_ids[half].astype(str))) for half in halves],
        },
        "n_scores_recomputed_float64": n_exact,
    }


def _label_figures(labels_csv, synthetic_ids, train_ids, synthetic_set, train_set, engine, threshold) -> dict:
    """Agreement of the audit with hand labels: CSV columns synthetic_id, train_id, label (copy or novel)."""
    text = storage.read_bytes(labels_csv).decode("utf-8")
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows or not {"synthetic_id", "train_id", "label"} <= set(rows[0]):
        raise ValueError(f"labels {labels_csv}: need a header with synthetic_id, train_id, label and at least one row")
    labels = [row["label"].strip().lower() for row in rows]
    unknown_labels = sorted(set(labels) - {"copy", "novel"})
    if unknown_labels:
        raise ValueError(f"labels {labels_csv}: label must be 'copy' or 'novel', found {unknown_labels}")
    synthetic_index = {str(sample_id): i for i, sample_id in enumerate(synthetic_ids)}
    train_index = {str(sample_id): i for i, sample_id in enumerate(train_ids)}
    missing = [row["synthetic_id"] for row in rows if row["synthetic_id"] not in synthetic_index]
    missing += [row["train_id"] for row in rows if row["train_id"] not in train_index]
    if missing:
        raise ValueError(f"labels {labels_csv}: sample ids not in the audited sets: {', '.join(missing[:_MAX_NAMED])}")
    syn_rows = np.array([synthetic_index[row["synthetic_id"]] for row in rows])
    train_rows = np.array([train_index[row["train_id"]] for row in rows])
    scores = kernel.exact_pair_scores(
        torch.from_numpy(engine.rows(synthetic_set, syn_rows)), torch.from_numpy(engine.rows(train_set, train_rows))
    ).numpy()
    return metrics.label_agreement(np.array(labels) == "copy", scores, threshold)


def matches_table(*, synthetic_ids, synthetic_patient_ids, train_ids, train_patient_ids, synthetic_to_train,
                  train_to_synthetic, chosen, planted_from) -> pa.Table:
    """The matches.parquet table (layout in the module docstring)."""

    def part(kind, ids, patients, neighbours, neighbour_ids, is_copy, is_memorized, planted):
        n = len(ids)
        return pa.table({
            "kind": pa.array([kind] * n, pa.string()),
            "sample_id": pa.array(ids.astype(str), pa.string()),
            "patient_id": pa.array(patients, pa.string()),
            "neighbour_ids": pa.array(neighbour_ids[neighbours.indices].astype(str).tolist(), pa.list_(pa.string())),
            "neighbour_indices": pa.array(neighbours.indices.tolist(), pa.list_(pa.int64())),
            "neighbour_scores": pa.array(neighbours.scores.tolist(), pa.list_(pa.float64())),
            "best_score": pa.array(neighbours.best, pa.float64()),
            "score_exact": pa.array(neighbours.exact, pa.bool_()),
            "is_copy": pa.array(is_copy, pa.bool_()),
            "is_memorized": pa.array(is_memorized, pa.bool_()),
            "planted_from": pa.array(planted, pa.string()),
        })

    none_synthetic = [None] * len(synthetic_ids)
    none_train = [None] * len(train_ids)
    return pa.concat_tables([
        part("synthetic", synthetic_ids, synthetic_patient_ids, synthetic_to_train, train_ids,
             chosen.is_copy.tolist(), none_synthetic, planted_from),
        part("train", train_ids, train_patient_ids, train_to_synthetic, synthetic_ids,
             none_train, chosen.is_memorized.tolist(), none_train),
    ])


def write_outputs(result: AuditResult, out_uri: str) -> None:
    """metrics.json and matches.parquet under out_uri (local or s3://)."""
    storage.write_bytes(storage.join(out_uri, "metrics.json"), json.dumps(result.metrics, indent=2).encode())
    buffer = io.BytesIO()
    pq.write_table(result.matches, buffer)
    storage.write_bytes(storage.join(out_uri, "matches.parquet"), buffer.getvalue())


def audit_embeddings(
    train_uri: str,
    val_uri: str,
    synthetic_uri: str,
    out_uri: str,
    *,
    percentile: float = 95.0,
    top_k: int = 5,
    calibration: str = "paper",
    plant_copies: int = 0,
    labels_csv: str | None = None,
    seed: int = 0,
    distributed: bool = False,
    block_rows: int = 4096,
    progress: bool = True,
) -> dict:
    """Run the audit (``run_audit``) and write metrics.json and matches.parquet under out_uri; returns the metrics."""
    result = run_audit(
        train_uri, val_uri, synthetic_uri, percentile=percentile, top_k=top_k, calibration=calibration,
        plant_copies=plant_copies, labels_csv=labels_csv, seed=seed, distributed=distributed,
        block_rows=block_rows, progress=progress,
    )
    write_outputs(result, out_uri)
    return result.metrics
