"""Simulated audits with a known truth (numpy only; no Ray): does each measured rate track the true one, and does
its 95 % interval cover it? Shared by tests/unit/test_statistics_simulation.py and
benchmarks/statistics_simulation.py; docs/statistics.md holds the figures and what they mean.

The embedding model (d = 32 dimensions, Pearson correlation as in the audit):

- an image of patient p: ``x = sqrt(rho) u_p + sqrt(1 - rho) e + a g``: u_p ~ N(0, I) the patient's shared
  component, e ~ N(0, I) the image's own noise, g a fixed centred direction of norm sqrt(d), a = hub_scale *
  |N(0, 1)| a loading drawn per image. Images with a large loading score high against every image that loads g:
  some training images are hubs. Two images of one patient correlate about rho.
- a novel generated sample (``Generator``): one image of a fresh patient, independent of every other sample; its
  own part (sqrt(rho) u + sqrt(1 - rho) e, i.e. N(0, I)) scaled by ``noise_scale`` and its loading raised by
  ``extra_loading``. noise_scale = 1 and extra_loading = 0: the distribution of real patients' images;
  noise_scale < 1, extra_loading > 0: smooth, shifted samples that score high against everything (what only the
  generator-null calibration measures).
- a generator that memorizes (``copy_share`` > 0): that share of its samples are a random training image plus
  ``copy_noise`` * N(0, I).

``run_once`` draws one audit (train, val, test or the val-half fallback, generated samples, optional
generator-null samples), runs the audit's own code on it (``raymem.audit.metrics.calibrate`` and
``Calibration.figures``, the metrics.json entry, on ``Searches`` built from brute-force float64 score matrices by
``searches_from_scores``; tests check that these equal ``run_audit``'s on the same embeddings), and computes the
true rates at that audit's own thresholds, conditional on its training set, from ``n_fresh`` fresh samples:

- copies: P(a fresh sample's best training match > the copy threshold), the share of fresh samples above it;
- memorized: the mean over training images j of P(at least one of n_synthetic independent fresh samples scores
  above the memorized threshold with x_j), estimated without bias from the c_j of n_fresh fresh samples above it
  as 1 - C(n_fresh - c_j, n_synthetic) / C(n_fresh, n_synthetic); patients likewise, c_P counting the fresh
  samples above it with any of the patient's images.

The false-positive rates' truth uses novel samples of the population (what evaluation patients stand for), the
headline shares' truth the scenario's generator, the generator_fpr_* truth the null generator.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raymem.audit import metrics, statistics

# figure -> (metrics key of the calibration figures, true rate key, factor of the figure's units)
FIGURES = {
    "measured_fpr_copies": ("measured_fpr_copies", "fpr_copies", 1.0),
    "measured_fpr_memorized": ("measured_fpr_memorized", "fpr_memorized", 1.0),
    "measured_fpr_memorized_patients": ("measured_fpr_memorized_patients", "fpr_memorized_patients", 1.0),
    "pct_copies": ("pct_copies", "copies", 100.0),
    "pct_memorized_train": ("pct_memorized_train", "memorized", 100.0),
    "pct_memorized_patients": ("pct_memorized_patients", "memorized_patients", 100.0),
    "generator_fpr_copies": ("generator_fpr_copies", "generator_fpr_copies", 1.0),
    "generator_fpr_memorized": ("generator_fpr_memorized", "generator_fpr_memorized", 1.0),
}


@dataclass(frozen=True)
class Population:
    """Real patients' embeddings: d dimensions, rho the patient component's share of the per-image variance,
    hub_scale the sd of the loadings on the common direction (0: no hubs)."""

    d: int = 32
    rho: float = 0.5
    hub_scale: float = 0.0

    def direction(self) -> np.ndarray:
        """The common direction g (d,): fixed, centred, norm sqrt(d)."""
        g = np.random.default_rng(12345).standard_normal(self.d)
        g -= g.mean()
        return g * math.sqrt(self.d) / np.linalg.norm(g)

    def patients(self, n_patients: int, images_per_patient: int, rng: np.random.Generator,
                 prefix: str) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings (n_patients * k, d), patient ids (n_patients * k,)): k images of each of n new patients."""
        shared = np.repeat(rng.standard_normal((n_patients, self.d)), images_per_patient, axis=0)
        n = n_patients * images_per_patient
        own = rng.standard_normal((n, self.d))
        loading = self.hub_scale * np.abs(rng.standard_normal((n, 1)))
        x = math.sqrt(self.rho) * shared + math.sqrt(1 - self.rho) * own + loading * self.direction()
        ids = np.repeat([f"{prefix}{i}" for i in range(n_patients)], images_per_patient).astype(object)
        return x, ids


@dataclass(frozen=True)
class Generator:
    """A generator's samples, each independent: novel ones an image of a fresh patient of ``population`` with its
    own part scaled by noise_scale and its loading on the common direction raised by extra_loading; a share
    copy_share of copies (a random training image plus copy_noise * N(0, I))."""

    population: Population
    noise_scale: float = 1.0
    extra_loading: float = 0.0
    copy_share: float = 0.0
    copy_noise: float = 0.3

    def novel(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """n images of n fresh patients (sqrt(rho) u + sqrt(1 - rho) e is N(0, I): one draw), transformed."""
        population = self.population
        loading = population.hub_scale * np.abs(rng.standard_normal((n, 1))) + self.extra_loading
        return self.noise_scale * rng.standard_normal((n, population.d)) + loading * population.direction()

    def sample(self, n: int, train: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        x = self.novel(n, rng)
        copies = rng.random(n) < self.copy_share
        sources = rng.integers(0, len(train), int(copies.sum()))
        x[copies] = train[sources] + self.copy_noise * rng.standard_normal((len(sources), x.shape[1]))
        return x


@dataclass(frozen=True)
class Scenario:
    """One simulated audit design. n_test_patients = 0: no test split (the val-half fallback)."""

    name: str
    population: Population = field(default_factory=Population)
    generator: Generator | None = None  # None: novel samples of the population itself
    null_generator: Generator | None = None  # generator-null samples (None: no generator calibration)
    images_per_patient: int = 4
    n_train_patients: int = 60
    n_val_patients: int = 40
    n_test_patients: int = 40
    n_synthetic: int = 240
    n_null: int = 480
    percentile: float = 95.0
    top_k: int = 1
    n_fresh: int = 20000

    @property
    def the_generator(self) -> Generator:
        return self.generator or Generator(self.population)


def standardized(rows: np.ndarray) -> np.ndarray:
    """Pearson's preparation: centre each row, L2-normalise (float64)."""
    rows = np.asarray(rows, dtype=np.float64)
    rows = rows - rows.mean(axis=1, keepdims=True)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _neighbours(scores: np.ndarray, k: int) -> metrics.Neighbours:
    """Each row's k best columns of a float64 score matrix (ties to the lower index), already exact."""
    if k == 1:
        order = scores.argmax(axis=1)[:, None]
    else:
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    best = np.take_along_axis(scores, order, axis=1)
    neighbours = metrics.Neighbours(best, order, lambda rows: (best[rows], order[rows]))
    neighbours.exact[:] = True
    return neighbours


def _all_pairs(scores: np.ndarray) -> metrics.TopPairs:
    """Every pair of a float64 (n_train, n_other) score matrix (complete above any threshold), already exact."""
    rows, cols = np.indices(scores.shape)
    pairs = metrics.TopPairs(scores.ravel(), rows.ravel(), cols.ravel(), scores.size, lambda r, c: scores[r, c])
    pairs.exact[:] = True
    return pairs


def searches_from_scores(train: np.ndarray, calibrate: np.ndarray, evaluate: np.ndarray, synthetic: np.ndarray,
                         train_patients: np.ndarray, eval_patients: np.ndarray, null: np.ndarray | None = None,
                         top_k: int = 1) -> metrics.Searches:
    """The audit's ``metrics.Searches`` from brute-force float64 correlations of the sets (n, d) (what
    ``raymem.audit.embeddings.run_audit`` builds from its search, exact here)."""
    train_std = standardized(train)

    def against_train(other):
        return standardized(other) @ train_std.T  # (n_other, n_train)

    val_train, eval_train, synthetic_train = against_train(calibrate), against_train(evaluate), against_train(synthetic)
    searches = metrics.Searches(
        train_to_val=_neighbours(val_train.T, 1), val_to_train=_neighbours(val_train, 1),
        val_pairs=_all_pairs(val_train.T),
        eval_to_train=_neighbours(eval_train, 1), eval_pairs=_all_pairs(eval_train.T),
        synthetic_to_train=_neighbours(synthetic_train, top_k), train_to_synthetic=_neighbours(synthetic_train.T, 1),
        train_patient_ids=np.asarray(train_patients), eval_patient_ids=np.asarray(eval_patients),
    )
    if null is not None:
        null_train = against_train(null)
        searches.null_to_train, searches.null_pairs = _neighbours(null_train, 1), _all_pairs(null_train.T)
    return searches


class Fresh:
    """n fresh samples of one distribution scored against the training set, for the true rates at thresholds of
    at least ``floor``: best (n,) each sample's best training score; the pairs above floor (sample, training
    image, score)."""

    def __init__(self, samples: np.ndarray, train_std: np.ndarray, images_per_patient: int, floor: float):
        # float32 products: their ~1e-7 errors move the truth far less than its Monte Carlo error
        scores = (standardized(samples).astype(np.float32) @ train_std.T.astype(np.float32)).astype(np.float64)
        self.n, self.n_train, self.floor = scores.shape[0], scores.shape[1], floor
        self.images_per_patient = images_per_patient  # training rows come patient by patient
        self.best = scores.max(axis=1)
        self.rows, self.cols = np.nonzero(scores > floor)
        self.scores = scores[self.rows, self.cols]

    def rates(self, tau_copies: float, tau_memorized: float, n_draws: int) -> tuple[float, float, float]:
        """(share above tau_copies; mean over training images, and over training patients, of the chance that
        n_draws independent samples flag it: 1 - C(n - c, n_draws) / C(n, n_draws), unbiased for n >= n_draws)."""
        assert tau_memorized >= self.floor
        keep = self.scores > tau_memorized
        n_patients = self.n_train // self.images_per_patient
        image_counts = np.bincount(self.cols[keep], minlength=self.n_train)
        sample_patient = np.unique(self.rows[keep] * n_patients + self.cols[keep] // self.images_per_patient)
        patient_counts = np.bincount(sample_patient % n_patients, minlength=n_patients)
        return (float((self.best > tau_copies).mean()),
                float(statistics.flag_probability(image_counts, self.n, n_draws).mean()),
                float(statistics.flag_probability(patient_counts, self.n, n_draws).mean()))


def true_rates(scenario: Scenario, fresh: dict[str, Fresh], calibration: metrics.Calibration) -> dict[str, float]:
    """The true rates (0-1) at the calibration's thresholds: fpr_copies, fpr_memorized, fpr_memorized_patients
    (from fresh["novel"], novel samples of the population: what the evaluation set measures), copies, memorized,
    memorized_patients (fresh["generator"], the generator's expected shares), generator_fpr_copies /
    generator_fpr_memorized (fresh["null"], novel samples of the null generator)."""
    thresholds = (calibration.threshold_copies, calibration.threshold_memorized, scenario.n_synthetic)
    truth = dict(zip(("fpr_copies", "fpr_memorized", "fpr_memorized_patients"), fresh["novel"].rates(*thresholds)))
    truth.update(zip(("copies", "memorized", "memorized_patients"), fresh["generator"].rates(*thresholds)))
    if "null" in fresh:
        truth["generator_fpr_copies"], truth["generator_fpr_memorized"], _ = fresh["null"].rates(*thresholds)
    return truth


def fresh_scores(scenario: Scenario, train: np.ndarray, floor: float, rng: np.random.Generator) -> dict[str, Fresh]:
    """scenario.n_fresh fresh samples of each distribution the truth needs, scored against the training set, for
    memorized thresholds of at least floor."""
    train_std, k, n = standardized(train), scenario.images_per_patient, scenario.n_fresh
    novel = Generator(scenario.population)
    fresh = {"novel": Fresh(novel.novel(n, rng), train_std, k, floor)}
    generator = scenario.the_generator
    fresh["generator"] = fresh["novel"] if generator == novel else \
        Fresh(generator.sample(n, train, rng), train_std, k, floor)
    if scenario.null_generator is not None:
        null = scenario.null_generator
        fresh["null"] = fresh["generator"] if null == generator else Fresh(null.novel(n, rng), train_std, k, floor)
    return fresh


@dataclass
class Draw:
    """One simulated audit: its sets, its Searches and the audit's figures of each calibration."""

    scenario: Scenario
    train: np.ndarray
    train_patients: np.ndarray
    calibrate: np.ndarray
    val_patients: np.ndarray
    evaluate: np.ndarray
    eval_patients: np.ndarray
    synthetic: np.ndarray
    null: np.ndarray | None
    searches: metrics.Searches
    calibrations: dict[str, metrics.Calibration]

    def write_parquet(self, folder) -> dict[str, str]:
        """The sets as embedding-schema Parquet files (float32) in folder: {"train", "val", "test", "synthetic",
        "null"} -> path ("test" only with a test split, "null" only with null samples). Sample ids are
        '<role><row>'; real sets carry their patient ids."""
        if self.scenario.n_test_patients == 0:
            raise ValueError("a val-half draw has no test split to write (its halves come from the audit's seed)")
        sets = {"train": (self.train, self.train_patients), "val": (self.calibrate, self.val_patients),
                "test": (self.evaluate, self.eval_patients), "synthetic": (self.synthetic, None)}
        if self.null is not None:
            sets["null"] = (self.null, None)
        return {role: write_embeddings(f"{folder}/{role}.parquet", embeddings, role, patients)
                for role, (embeddings, patients) in sets.items()}

    def as_float32(self) -> Draw:
        """The same audit on the float32 embeddings run_audit reads (its figures recomputed on them)."""
        cast = {name: None if getattr(self, name) is None else getattr(self, name).astype(np.float32).astype(np.float64)
                for name in ("train", "calibrate", "evaluate", "synthetic", "null")}
        return _audit(self.scenario, cast["train"], self.train_patients, cast["calibrate"], self.val_patients,
                      cast["evaluate"], self.eval_patients, cast["synthetic"], cast["null"])


def write_embeddings(path: str, embeddings: np.ndarray, prefix: str, patient_ids: np.ndarray | None) -> str:
    """An embedding-schema Parquet file: sample_id '<prefix><row>', patient_id (if given), embedding (float32)."""
    columns = {"sample_id": [f"{prefix}{i}" for i in range(len(embeddings))]}
    if patient_ids is not None:
        columns["patient_id"] = [str(p) for p in patient_ids]
    columns["embedding"] = pa.array(list(np.asarray(embeddings, dtype=np.float32)),
                                    type=pa.list_(pa.float32(), embeddings.shape[1]))
    pq.write_table(pa.table(columns), path)
    return str(path)


def draw(scenario: Scenario, rng: np.random.Generator) -> Draw:
    """Draw one audit's sets and run the audit's calibrations (every one available) on them."""
    population, k = scenario.population, scenario.images_per_patient
    train, train_patients = population.patients(scenario.n_train_patients, k, rng, "tp")
    val, val_patients = population.patients(scenario.n_val_patients, k, rng, "vp")
    if scenario.n_test_patients:
        evaluate, eval_patients = population.patients(scenario.n_test_patients, k, rng, "ep")
    else:  # the audit's fallback: half of the validation patients calibrate, the other half evaluates
        first, second = metrics.split_by_patient(val_patients, rng)
        val, val_patients, evaluate, eval_patients = val[first], val_patients[first], val[second], val_patients[second]
    synthetic = scenario.the_generator.sample(scenario.n_synthetic, train, rng)
    null = scenario.null_generator.novel(scenario.n_null, rng) if scenario.null_generator is not None else None
    return _audit(scenario, train, train_patients, val, val_patients, evaluate, eval_patients, synthetic, null)


def _audit(scenario, train, train_patients, calibrate, val_patients, evaluate, eval_patients, synthetic, null) -> Draw:
    searches = searches_from_scores(train, calibrate, evaluate, synthetic, train_patients, eval_patients, null,
                                    scenario.top_k)
    names = [name for name in metrics.CALIBRATIONS if name != "generator" or null is not None]
    calibrations = {name: metrics.calibrate(name, searches, scenario.percentile) for name in names}
    return Draw(scenario, train, train_patients, calibrate, val_patients, evaluate, eval_patients, synthetic, null,
                searches, calibrations)


@dataclass
class Outcome:
    """Per repetition: figures[calibration][figure] = (estimate, lo, hi) in 0-1; truth[calibration][rate]."""

    figures: dict[str, dict[str, tuple[float, float, float]]]
    truth: dict[str, dict[str, float]]


def run_once(scenario: Scenario, seed: int, variants: dict[str, Callable[[Draw, str], tuple[float, float, float]]]
             | None = None) -> Outcome:
    """One repetition: the audit's figures (from ``Calibration.figures``, the metrics.json entry) and the truth
    at each calibration's thresholds; ``variants`` add figures computed by other functions (name -> f(draw,
    calibration name) -> (estimate, lo, hi) in 0-1), e.g. a deliberately broken interval."""
    rng = np.random.default_rng(seed)
    audit = draw(scenario, rng)
    floor = min(calibration.threshold_memorized for calibration in audit.calibrations.values())
    fresh = fresh_scores(scenario, audit.train, floor, rng)
    figures, truth = {}, {}
    for name, calibration in audit.calibrations.items():
        entry = calibration.figures()
        figures[name] = {}
        for figure, (key, _, factor) in FIGURES.items():
            if key in entry:
                lo, hi = entry["ci95"][key]
                figures[name][figure] = (entry[key] / factor, lo / factor, hi / factor)
        for variant, compute in (variants or {}).items():
            figures[name][variant] = compute(audit, name)
        truth[name] = true_rates(scenario, fresh, calibration)
    return Outcome(figures, truth)


@dataclass
class Summary:
    """Over repetitions, per (calibration, figure): the mean true rate, mean measured rate, mean |error|, mean
    interval width, share of intervals holding the truth (all in 0-1)."""

    scenario: str
    calibration: str
    figure: str
    true_rate: float
    measured: float
    bias: float
    width: float
    coverage: float
    repetitions: int


def summarise(scenario: Scenario, outcomes: list[Outcome], truth_of: dict[str, str] | None = None) -> list[Summary]:
    """Coverage and error of every figure over the outcomes. truth_of maps a variant's name to the true rate it
    estimates (FIGURES gives the audit's own figures')."""
    truth_of = {**{figure: rate for figure, (_, rate, _) in FIGURES.items()}, **(truth_of or {})}
    rows = []
    for name in outcomes[0].figures:
        for figure in outcomes[0].figures[name]:
            rate = truth_of[figure]
            if rate not in outcomes[0].truth[name]:
                continue
            values = np.array([o.figures[name][figure] for o in outcomes])  # (R, 3)
            truth = np.array([o.truth[name][rate] for o in outcomes])
            rows.append(Summary(scenario.name, name, figure, float(truth.mean()), float(values[:, 0].mean()),
                                float((values[:, 0] - truth).mean()), float((values[:, 2] - values[:, 1]).mean()),
                                float(((values[:, 1] <= truth) & (truth <= values[:, 2])).mean()), len(outcomes)))
    return rows


def simulate(scenario: Scenario, repetitions: int, seed: int = 0, variants=None, truth_of=None) -> list[Summary]:
    """``summarise`` over ``repetitions`` runs (seeds seed * 100003 + r), BLAS on one thread (small matrices:
    threads only contend)."""
    with _one_thread():
        outcomes = [run_once(scenario, seed * 100_003 + r, variants) for r in range(repetitions)]
    return summarise(scenario, outcomes, truth_of)


def _one_thread():
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scipy's usual installs
        return contextlib.nullcontext()
    return threadpool_limits(1)


# Variants: other estimators run on the same draws, to show what the tolerance of the tests rejects (broken on
# purpose) and what the evaluation set cannot see. name -> (f(draw, calibration name) -> (estimate, lo, hi) in
# 0-1, the true rate it is compared with). None of them is an audit figure.


def _val_half_draws(audit: Draw, name: str) -> tuple[float, float, float]:
    """Broken: the memorized false-positive rate at n_eval draws (an early version's number of draws: the size of
    the evaluating validation half) instead of n_synthetic."""
    rows, cols = audit.searches.eval_pairs.above(audit.calibrations[name].threshold_memorized)
    share = statistics.memorized_rate_interval(rows, cols, len(audit.train), audit.eval_patients, len(audit.evaluate))
    return share.estimate, share.lo, share.hi


def _unclustered_wilson(audit: Draw, name: str) -> tuple[float, float, float]:
    """Broken: measured_fpr_copies with a Wilson interval over n_eval images, as if no two came from one patient."""
    flags = audit.searches.eval_to_train.exceeds(audit.calibrations[name].threshold_copies)
    return (float(flags.mean()), *statistics.wilson_interval(int(flags.sum()), len(flags)))


def _test_rate_against_the_generator(audit: Draw, name: str) -> tuple[float, float, float]:
    """measured_fpr_copies (evaluation patients) held against the generator's own novel samples' copy rate: what
    the evaluation set cannot see when the generator's samples are shifted."""
    share = audit.calibrations[name].fpr_copies
    return share.estimate, share.lo, share.hi


VARIANTS = {
    "measured_fpr_copies vs the generator's rate": (_test_rate_against_the_generator, "copies"),
    "broken: val-half draws": (_val_half_draws, "fpr_memorized"),
    "broken: unclustered Wilson": (_unclustered_wilson, "fpr_copies"),
}


def simulate_variants(scenario: Scenario, repetitions: int, names=tuple(VARIANTS), seed: int = 0) -> list[Summary]:
    """``simulate`` with the named VARIANTS beside the audit's figures."""
    chosen = {name: VARIANTS[name] for name in names}
    return simulate(scenario, repetitions, seed, {name: f for name, (f, _) in chosen.items()},
                    {name: truth for name, (_, truth) in chosen.items()})


HUBS = Population(rho=0.8, hub_scale=0.6)
SHIFTED = Generator(HUBS, noise_scale=0.7, extra_loading=0.5)
SCENARIOS = {scenario.name: scenario for scenario in (
    Scenario("iid", Population(rho=0.0), images_per_patient=1, n_train_patients=240, n_val_patients=160,
             n_test_patients=320),
    Scenario("patients", Population(rho=0.8), n_test_patients=80),
    Scenario("patients+hubs", HUBS, n_test_patients=80),
    Scenario("10 val patients", HUBS, n_val_patients=10, n_test_patients=80),
    Scenario("10 test patients", HUBS, n_test_patients=10),
    Scenario("val-half", HUBS, n_val_patients=80, n_test_patients=0),
    Scenario("more generated than test", Population(rho=0.8), n_test_patients=40),
    Scenario("32 generated", HUBS, n_test_patients=80, n_synthetic=32),
    Scenario("shifted generator", HUBS, generator=SHIFTED, null_generator=SHIFTED, n_test_patients=80),
    Scenario("20 % copies", HUBS, generator=Generator(HUBS, copy_share=0.2), n_test_patients=80),
)}
"""The scenarios of docs/statistics.md (sizes: 60 training patients x 4 images unless said; 240 generated
samples; percentile 95)."""
