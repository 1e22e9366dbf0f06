"""raymem.audit.simulation, the harness behind the statistics figures, part by part against independent
references: the embedding model's moments, brute-force Pearson correlations (np.corrcoef), the true rates counted
by loops with math.comb, and summaries of hand-made outcomes (numpy only; no Ray).

Written to pin down behaviour that mutation testing (tools/mutation.sh) found unchecked: the coverage tests of
test_statistics_simulation.py judge whole simulations with a tolerance, so a harness fault that moves a truth or
an interval a little, or the same way for truth and figure, can pass them."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest

from raymem.audit import metrics, statistics
from raymem.audit import simulation as sim
from raymem.audit.simulation import Draw, Fresh, Generator, Outcome, Population, Scenario

SMALL = Scenario("small", Population(rho=0.8, hub_scale=0.6), images_per_patient=3, n_train_patients=7,
                 n_val_patients=5, n_test_patients=4, n_synthetic=11, n_null=9, n_fresh=400)


def corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) Pearson correlations by np.corrcoef: the independent reference."""
    return np.corrcoef(np.vstack([a, b]))[: len(a), len(a):]


# --- the embedding model --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("d", [5, 32])
def test_the_common_direction_is_fixed_centred_and_of_norm_sqrt_d(d):
    g = Population(d=d).direction()

    assert (g.shape, abs(g.mean()) < 1e-12, np.linalg.norm(g)) == ((d,), True, pytest.approx(math.sqrt(d)))
    np.testing.assert_array_equal(g, Population(d=d, rho=0.1, hub_scale=3.0).direction())


def test_patients_have_the_documented_ids_and_within_patient_correlation():
    population = Population(d=32, rho=0.8)
    x, ids = population.patients(1500, 2, np.random.default_rng(0), "tp")

    pairs = np.einsum("ij,ij->i", x[0::2], x[1::2]) / 32  # same patient: E = rho
    others = np.einsum("ij,ij->i", x[0:-2:2], x[3::2]) / 32  # different patients: E = 0

    assert (x.shape, list(ids[:5]), ids.dtype) == ((3000, 32), ["tp0", "tp0", "tp1", "tp1", "tp2"], object)
    assert abs(pairs.mean() - 0.8) < 0.03 and abs(others.mean()) < 0.03 and abs(x.var() - 1.0) < 0.03


def test_a_patient_with_rho_one_repeats_one_image_and_hubs_load_on_the_direction():
    x, _ = Population(d=8, rho=1.0).patients(3, 4, np.random.default_rng(1), "p")
    hubs, _ = Population(d=32, rho=0.5, hub_scale=0.6).patients(4000, 1, np.random.default_rng(2), "p")
    g = Population(d=32).direction()

    loadings = hubs @ g / 32  # E = hub_scale * E|N(0, 1)| = 0.6 * sqrt(2 / pi)
    np.testing.assert_array_equal(x[0:4], np.repeat(x[:1], 4, axis=0))
    assert abs(loadings.mean() - 0.6 * math.sqrt(2 / math.pi)) < 0.02
    assert abs(hubs.var() - (1 + 0.6**2)) < 0.03  # per coordinate: 1 + E[a^2] |g|^2 / d


def test_novel_samples_have_the_generators_noise_and_loading():
    generator = Generator(Population(d=32, hub_scale=0.6), noise_scale=0.7, extra_loading=0.5)
    g = generator.population.direction()
    x = generator.novel(4000, np.random.default_rng(3))

    loadings = x @ g / 32
    residual = x - loadings[:, None] * g  # the noise with its component along g removed: 31 of 32 dimensions

    assert abs(loadings.mean() - (0.5 + 0.6 * math.sqrt(2 / math.pi))) < 0.02
    assert abs(residual.std() - 0.7 * math.sqrt(31 / 32)) < 0.005


def test_a_copying_generator_copies_every_training_image_including_the_first():
    train = np.array([[10.0] * 4 + [-10.0] * 4, [-10.0] * 4 + [10.0] * 4])

    x = Generator(Population(d=8), copy_share=1.0, copy_noise=0.0).sample(40, train, np.random.default_rng(19))

    assert sorted({tuple(row) for row in x.tolist()}) == sorted(tuple(row) for row in train.tolist())


@pytest.mark.parametrize("copy_share, copy_noise", [(1.0, 0.0), (0.25, 0.0), (1.0, 0.3), (0.0, 0.3)])
def test_a_copying_generator_returns_training_images_plus_noise_at_its_share(copy_share, copy_noise):
    train = np.random.default_rng(4).standard_normal((20, 32)) * 5.0
    generator = Generator(Population(d=32), copy_share=copy_share, copy_noise=copy_noise)

    x = generator.sample(2000, train, np.random.default_rng(5))

    distances = np.linalg.norm(x[:, None, :] - train[None], axis=-1).min(axis=1)  # to the nearest training image
    copies = distances < 3.0  # a copy sits 0.3 * sqrt(32) = 1.7 away, a novel sample about 30
    assert abs(copies.mean() - copy_share) < 0.03
    if copy_share:
        assert abs(distances[copies].mean() / math.sqrt(32) - copy_noise) < 0.02


# --- the audit's searches from score matrices -----------------------------------------------------------------------

def test_standardized_rows_give_pearson_correlations():
    rows = np.random.default_rng(6).normal(3.0, 2.0, size=(5, 9))

    z = sim.standardized(rows)

    np.testing.assert_allclose(z @ z.T, np.corrcoef(rows), atol=1e-12)
    np.testing.assert_allclose(z.sum(axis=1), 0.0, atol=1e-12)


@pytest.mark.parametrize("k", [1, 2])
def test_neighbours_are_each_rows_best_columns_ties_to_the_lower_index(k):
    scores = np.array([[0.1, 0.9, 0.9, 0.2], [0.5, 0.4, 0.3, 0.6]])

    neighbours = sim._neighbours(scores, k)

    expected = ([[1, 2], [3, 0]], [[0.9, 0.9], [0.6, 0.5]])
    np.testing.assert_array_equal(neighbours.indices, np.array(expected[0])[:, :k])
    np.testing.assert_array_equal(neighbours.scores, np.array(expected[1])[:, :k])
    assert neighbours.exact.all()
    best, order = neighbours._recompute(np.array([1]))
    np.testing.assert_array_equal(order, np.array(expected[0])[1:, :k])


def test_neighbours_of_long_rows_with_many_ties_keep_the_lower_columns():
    scores = np.random.default_rng(20).integers(0, 3, size=(6, 200)).astype(np.float64)

    neighbours = sim._neighbours(scores, 30)

    np.testing.assert_array_equal(neighbours.indices, np.argsort(-scores, axis=1, kind="stable")[:, :30])


def test_all_pairs_hold_every_pair_with_its_row_and_column():
    scores = np.array([[0.1, 0.7, 0.3], [0.9, 0.2, 0.8]])

    pairs = sim._all_pairs(scores)
    rows, cols = pairs.above(0.25)

    assert (pairs.n_pairs, pairs.covers(-1.0), pairs.exact.all(), sorted(zip(rows.tolist(), cols.tolist()))) == (
        6, True, True, [(0, 1), (0, 2), (1, 0), (1, 2)])
    np.testing.assert_array_equal(pairs.recompute(np.array([1, 0]), np.array([2, 1])), [0.8, 0.7])


@pytest.mark.parametrize("top_k", [1, 2])
def test_searches_match_brute_force_correlations(top_k):
    rng = np.random.default_rng(7)
    train, val, evaluate, synthetic, null = (rng.standard_normal((n, 6)) for n in (7, 5, 4, 9, 3))
    train_patients, eval_patients = np.arange(7) // 2, np.arange(4) // 2

    searches = sim.searches_from_scores(train, val, evaluate, synthetic, train_patients, eval_patients, null, top_k)

    train_val, train_eval, train_syn, train_null = (corr(train, other) for other in (val, evaluate, synthetic, null))
    checks = {
        "train_to_val": (searches.train_to_val, train_val), "val_to_train": (searches.val_to_train, train_val.T),
        "eval_to_train": (searches.eval_to_train, train_eval.T),
        "train_to_synthetic": (searches.train_to_synthetic, train_syn),
        "null_to_train": (searches.null_to_train, train_null.T),
    }
    for name, (neighbours, reference) in checks.items():
        np.testing.assert_allclose(neighbours.best, reference.max(axis=1), atol=1e-12, err_msg=name)
        np.testing.assert_array_equal(neighbours.best_index, reference.argmax(axis=1), err_msg=name)
    np.testing.assert_array_equal(searches.synthetic_to_train.indices, np.argsort(-train_syn.T, axis=1)[:, :top_k])
    for name, pairs, reference in (("val", searches.val_pairs, train_val), ("eval", searches.eval_pairs, train_eval),
                                   ("null", searches.null_pairs, train_null)):
        rows, cols = pairs.above(0.3)
        assert sorted(zip(rows.tolist(), cols.tolist())) == sorted(zip(*np.nonzero(reference > 0.3))), name
    shapes = {name: neighbours.scores.shape for name, (neighbours, _) in checks.items()}
    assert shapes == {"train_to_val": (7, 1), "val_to_train": (5, 1), "eval_to_train": (4, 1),
                      "train_to_synthetic": (7, 1), "null_to_train": (3, 1)}
    assert searches.synthetic_to_train.scores.shape == (9, top_k)
    default = sim.searches_from_scores(train, val, evaluate, synthetic, train_patients, eval_patients)
    assert default.synthetic_to_train.scores.shape == (9, 1)
    np.testing.assert_array_equal(searches.train_patient_ids, train_patients)
    np.testing.assert_array_equal(searches.eval_patient_ids, eval_patients)


def test_searches_without_null_samples_have_no_null_search():
    rng = np.random.default_rng(8)
    sets = [rng.standard_normal((n, 6)) for n in (4, 3, 3, 5)]

    searches = sim.searches_from_scores(*sets, np.arange(4), np.arange(3))

    assert (searches.null_to_train, searches.null_pairs) == (None, None)


# --- the truth ------------------------------------------------------------------------------------------------------

def reference_rates(samples, train, images_per_patient, tau_copies, tau_memorized, n_draws):
    """The true rates by loops: share of samples whose best training score is above tau_copies; the mean over
    training images (patients) of 1 - C(n - c, n_draws) / C(n, n_draws), c the samples above tau_memorized with
    the image (with any of the patient's images)."""
    scores = corr(samples, train)
    n = len(samples)

    def flag(c):
        return 1.0 - math.comb(n - c, n_draws) / math.comb(n, n_draws)

    images = [flag(int((scores[:, j] > tau_memorized).sum())) for j in range(len(train))]
    patients = [flag(int((scores[:, p:p + images_per_patient] > tau_memorized).any(axis=1).sum()))
                for p in range(0, len(train), images_per_patient)]
    return float((scores.max(axis=1) > tau_copies).mean()), float(np.mean(images)), float(np.mean(patients))


def test_fresh_rates_equal_the_counted_reference():
    rng = np.random.default_rng(9)
    train = rng.standard_normal((12, 4))  # 4 patients of 3 images; d = 4 makes high correlations common
    samples = rng.standard_normal((60, 4))

    fresh = Fresh(samples, sim.standardized(train), 3, floor=0.2)
    observed = fresh.rates(0.8, 0.6, 7)

    expected = reference_rates(samples, train, 3, 0.8, 0.6, 7)
    assert 0 < expected[1] < expected[2] < 1 and 0 < expected[0] < 1
    assert observed == pytest.approx(expected, abs=1e-12)
    assert (fresh.n, fresh.n_train, fresh.floor) == (60, 12, 0.2)
    np.testing.assert_allclose(fresh.best, corr(samples, train).max(axis=1), atol=1e-5)
    assert bool((fresh.scores > 0.2).all()) and len(fresh.scores) == int((corr(samples, train) > 0.2).sum())


def test_training_images_and_patients_no_sample_reaches_count_in_the_true_rates():
    """The last training image (its own patient) is anti-correlated with every sample: it counts as a zero in the
    means over images and patients, not as missing."""
    base = np.array([1.0, -1.0, 2.0, -2.0, 0.5, -0.5])
    train = np.stack([base, base[::-1], -base])  # three patients of one image each
    samples = base + np.random.default_rng(21).normal(0, 0.3, size=(50, 6))

    observed = Fresh(samples, sim.standardized(train), 1, floor=0.0).rates(0.5, 0.5, 5)

    expected = reference_rates(samples, train, 1, 0.5, 0.5, 5)
    assert (corr(samples, train)[:, 2] > 0.5).sum() == 0 and expected[1] < 2 / 3
    assert observed == pytest.approx(expected, abs=1e-12)


def test_a_memorized_threshold_below_the_floor_is_refused():
    fresh = Fresh(np.eye(3), sim.standardized(np.eye(3)), 1, floor=0.5)

    with pytest.raises(AssertionError):
        fresh.rates(0.9, 0.4, 1)


class Fixed:
    """A stand-in for Fresh that returns fixed rates and records the thresholds it was asked for."""

    def __init__(self, *rates):
        self.rates_given, self.asked = rates, []

    def rates(self, tau_copies, tau_memorized, n_draws):
        self.asked.append((tau_copies, tau_memorized, n_draws))
        return self.rates_given


def test_true_rates_take_each_rate_from_its_own_distribution_at_the_calibrations_thresholds():
    calibration = replace(next(iter(sim.draw(SMALL, np.random.default_rng(10)).calibrations.values())),
                          threshold_copies=0.91, threshold_memorized=0.93)
    fresh = {"novel": Fixed(0.1, 0.2, 0.3), "generator": Fixed(0.4, 0.5, 0.6), "null": Fixed(0.7, 0.8, 0.9)}

    truth = sim.true_rates(SMALL, fresh, calibration)

    assert truth == {"fpr_copies": 0.1, "fpr_memorized": 0.2, "fpr_memorized_patients": 0.3, "copies": 0.4,
                     "memorized": 0.5, "memorized_patients": 0.6, "generator_fpr_copies": 0.7,
                     "generator_fpr_memorized": 0.8}
    assert {name: f.asked for name, f in fresh.items()} == dict.fromkeys(fresh, [(0.91, 0.93, 11)])
    assert "generator_fpr_copies" not in sim.true_rates(SMALL, {k: fresh[k] for k in ("novel", "generator")},
                                                        calibration)


def test_fresh_scores_reuse_a_distribution_only_when_it_is_the_same_generator():
    train = np.random.default_rng(11).standard_normal((SMALL.n_train_patients * 3, 32))
    copying = Generator(SMALL.population, copy_share=0.5)

    plain = sim.fresh_scores(SMALL, train, 0.3, np.random.default_rng(12))
    own = sim.fresh_scores(replace(SMALL, generator=copying, null_generator=copying), train, 0.3,
                           np.random.default_rng(12))
    other = sim.fresh_scores(replace(SMALL, generator=copying, null_generator=Generator(SMALL.population)), train,
                             0.3, np.random.default_rng(12))

    assert (set(plain), plain["generator"] is plain["novel"]) == ({"novel", "generator"}, True)
    assert (own["null"] is own["generator"], own["generator"] is own["novel"]) == (True, False)
    assert (other["null"] is other["generator"], other["null"].n, other["null"].floor) == (False, 400, 0.3)
    assert (plain["novel"].n, plain["novel"].n_train, plain["novel"].images_per_patient) == (400, 21, 3)
    assert (own["generator"].images_per_patient, other["null"].images_per_patient) == (3, 3)
    np.testing.assert_array_equal(plain["novel"].best, own["novel"].best)  # the same draws from the same seed
    copies = (own["generator"].best > 0.85).mean()  # copy_noise 0.3: correlation about 1 / sqrt(1.09) = 0.96
    assert 0.4 < copies < 0.6


# --- one audit ------------------------------------------------------------------------------------------------------

def test_a_draw_has_the_scenarios_sets_and_every_calibration_it_can_run():
    with_null = replace(SMALL, null_generator=Generator(SMALL.population))

    plain, nulled = sim.draw(SMALL, np.random.default_rng(13)), sim.draw(with_null, np.random.default_rng(13))

    sizes = [len(getattr(plain, name)) for name in ("train", "calibrate", "evaluate", "synthetic")]
    assert (sizes, plain.null, len(nulled.null)) == ([21, 15, 12, 11], None, 9)
    assert sim.draw(replace(SMALL, top_k=2), np.random.default_rng(13)).searches.synthetic_to_train.scores.shape == (
        11, 2)
    assert (list(plain.calibrations), list(nulled.calibrations)) == (
        [c for c in metrics.CALIBRATIONS if c != "generator"], list(metrics.CALIBRATIONS))
    assert (plain.train_patients[:4].tolist(), plain.val_patients[0], plain.eval_patients[-1]) == (
        ["tp0", "tp0", "tp0", "tp1"], "vp0", "ep3")
    expected = metrics.calibrate("paper", sim.searches_from_scores(
        plain.train, plain.calibrate, plain.evaluate, plain.synthetic, plain.train_patients, plain.eval_patients),
        SMALL.percentile)
    assert plain.calibrations["paper"].figures() == expected.figures()


def test_without_a_test_split_half_of_the_validation_patients_evaluate():
    audit = sim.draw(replace(SMALL, n_val_patients=8, n_test_patients=0), np.random.default_rng(14))

    calibrating, evaluating = set(audit.val_patients), set(audit.eval_patients)
    assert (len(audit.calibrate) + len(audit.evaluate), calibrating & evaluating, len(calibrating | evaluating)) == (
        24, set(), 8)
    assert len(audit.calibrate) == 3 * len(calibrating) and len(audit.evaluate) == 3 * len(evaluating)
    with pytest.raises(ValueError, match=r"^a val-half draw has no test split to write \(its halves come from the "
                                         r"audit's seed\)$"):
        audit.write_parquet("unused")


def test_the_sets_are_written_as_embedding_parquet_files(tmp_path):
    audit = sim.draw(replace(SMALL, null_generator=Generator(SMALL.population)), np.random.default_rng(15))

    paths = audit.write_parquet(tmp_path)

    tables = {role: pq.read_table(path).to_pydict() for role, path in paths.items()}
    assert set(paths) == {"train", "val", "test", "synthetic", "null"}
    assert (tables["train"]["sample_id"][:2], tables["test"]["patient_id"][:4], "patient_id" in tables["null"],
            "patient_id" in tables["synthetic"]) == (["train0", "train1"], ["ep0"] * 3 + ["ep1"], False, False)
    np.testing.assert_array_equal(np.array(tables["val"]["embedding"]), audit.calibrate.astype(np.float32))
    np.testing.assert_array_equal(np.array(tables["null"]["embedding"]), audit.null.astype(np.float32))
    assert pq.read_schema(paths["synthetic"]).field("embedding").type.list_size == 32
    no_null = sim.draw(SMALL, np.random.default_rng(15)).write_parquet(tmp_path / "..")
    assert "null" not in no_null


def test_the_float32_audit_recomputes_its_figures_on_the_rounded_embeddings():
    audit = sim.draw(replace(SMALL, null_generator=Generator(SMALL.population)), np.random.default_rng(16))

    rounded = audit.as_float32()

    for name in ("train", "calibrate", "evaluate", "synthetic", "null"):
        np.testing.assert_array_equal(getattr(rounded, name), getattr(audit, name).astype(np.float32))
    searches = sim.searches_from_scores(rounded.train, rounded.calibrate, rounded.evaluate, rounded.synthetic,
                                        audit.train_patients, audit.eval_patients, rounded.null)
    assert rounded.calibrations["generator"].figures() == metrics.calibrate("generator", searches, 95.0).figures()
    assert rounded.scenario is audit.scenario and rounded.val_patients is audit.val_patients
    assert sim.draw(SMALL, np.random.default_rng(16)).as_float32().null is None


def test_one_run_reports_the_calibrations_figures_in_fractions_and_the_truth_at_its_thresholds():
    copying = replace(SMALL, generator=Generator(SMALL.population, copy_share=0.5))
    outcome = sim.run_once(copying, 17, {"constant": lambda audit, name: (0.5, 0.25, 0.75)})

    audit = sim.draw(copying, np.random.default_rng(17))  # the same draw: run_once seeds its generator with the seed
    for name, calibration in audit.calibrations.items():
        entry = calibration.figures()
        expected = {figure: (entry[key] / factor, entry["ci95"][key][0] / factor, entry["ci95"][key][1] / factor)
                    for figure, (key, _, factor) in sim.FIGURES.items() if key in entry}
        assert outcome.figures[name] == expected | {"constant": (0.5, 0.25, 0.75)}
        assert 0.2 < outcome.figures[name]["pct_copies"][1] < outcome.figures[name]["pct_copies"][0] < 1
    floor = min(c.threshold_memorized for c in audit.calibrations.values())
    rng = np.random.default_rng(17)
    sim.draw(copying, rng)
    fresh = sim.fresh_scores(copying, audit.train, floor, rng)
    assert outcome.truth == {name: sim.true_rates(copying, fresh, c) for name, c in audit.calibrations.items()}


# --- summaries ------------------------------------------------------------------------------------------------------

def test_a_summary_averages_truth_estimate_error_width_and_coverage():
    outcomes = [Outcome({"paper": {"pct_copies": (0.30, 0.20, 0.40), "odd": (0.5, 0.4, 0.6)}},
                        {"paper": {"copies": 0.25, "x": 0.6}}),
                Outcome({"paper": {"pct_copies": (0.10, 0.05, 0.20), "odd": (0.7, 0.6, 0.8)}},
                        {"paper": {"copies": 0.20, "x": 0.9}}),
                Outcome({"paper": {"pct_copies": (0.44, 0.40, 0.45), "odd": (0.1, 0.0, 0.2)}},
                        {"paper": {"copies": 0.50, "x": 0.2}}),
                Outcome({"paper": {"pct_copies": (0.44, 0.40, 0.45), "odd": (0.1, 0.0, 0.2)}},
                        {"paper": {"copies": 0.40, "x": 0.0}})]

    rows = sim.summarise(SMALL, outcomes, {"odd": "x"})

    by_figure = {row.figure: row for row in rows}
    copies, odd = by_figure["pct_copies"], by_figure["odd"]
    assert (copies.scenario, copies.calibration, copies.repetitions) == ("small", "paper", 4)
    assert (copies.true_rate, copies.measured, copies.bias, copies.width, copies.coverage) == pytest.approx(
        (1.35 / 4, 1.28 / 4, (0.05 - 0.10 - 0.06 + 0.04) / 4, (0.2 + 0.15 + 0.05 + 0.05) / 4, 3 / 4))
    assert (odd.true_rate, odd.coverage) == pytest.approx((1.7 / 4, 3 / 4))  # either bound counts as covered


def test_a_figure_whose_truth_is_not_known_is_left_out_of_the_summary():
    outcomes = [Outcome({"paper": {"generator_fpr_copies": (0.1, 0.0, 0.2), "pct_copies": (0.1, 0.0, 0.2)}},
                        {"paper": {"copies": 0.1}})]

    assert [row.figure for row in sim.summarise(SMALL, outcomes)] == ["pct_copies"]


def test_simulate_summarises_run_once_over_its_documented_seeds():
    small = replace(SMALL, n_fresh=100)

    rows = sim.simulate(small, 2, seed=3)

    expected = sim.summarise(small, [sim.run_once(small, 3 * 100_003 + r) for r in range(2)])
    assert rows == expected and rows[0].repetitions == 2


def test_simulations_default_to_seed_zero_and_run_blas_on_one_thread():
    from threadpoolctl import threadpool_info

    small, threads = replace(SMALL, n_fresh=100), []

    def recording(audit, name):
        threads.extend(pool["num_threads"] for pool in threadpool_info())
        return 0.5, 0.25, 0.75

    assert sim.simulate(small, 1) == sim.simulate(small, 1, seed=0) != sim.simulate(small, 1, seed=1)
    assert sim.simulate_variants(small, 1) == sim.simulate_variants(small, 1, seed=0)
    sim.simulate(small, 1, variants={"recording": recording}, truth_of={"recording": "copies"})
    assert threads and set(threads) == {1}


def test_the_variants_compute_what_their_names_say():
    audit = sim.draw(replace(SMALL, n_synthetic=40, n_test_patients=8), np.random.default_rng(19))
    calibration = audit.calibrations["paper"]

    flags = audit.searches.eval_to_train.best > calibration.threshold_copies
    rows, cols = audit.searches.eval_pairs.above(calibration.threshold_memorized)
    assert len(rows) > 0 and 0 < flags.sum() < len(flags)  # figures that are not the empty case
    at_n_eval = statistics.memorized_rate_interval(rows, cols, 21, audit.eval_patients, 24)

    assert sim._unclustered_wilson(audit, "paper") == (flags.mean(), *statistics.wilson_interval(int(flags.sum()),
                                                                                                   24))
    assert sim._val_half_draws(audit, "paper") == (at_n_eval.estimate, at_n_eval.lo, at_n_eval.hi)
    share = calibration.fpr_copies
    assert sim._test_rate_against_the_generator(audit, "paper") == (share.estimate, share.lo, share.hi)


def test_simulate_variants_adds_the_named_variants_with_their_truths():
    small = replace(SMALL, n_fresh=100)

    rows = sim.simulate_variants(small, 1, names=("broken: unclustered Wilson",), seed=2)

    variant = [row for row in rows if row.figure == "broken: unclustered Wilson"]
    own = {(row.calibration, row.figure): row for row in rows}
    assert [row.calibration for row in variant] == [c for c in metrics.CALIBRATIONS if c != "generator"]
    assert variant[0].true_rate == own["paper", "measured_fpr_copies"].true_rate  # compared with fpr_copies
    assert not any(row.figure == "broken: val-half draws" for row in rows)
