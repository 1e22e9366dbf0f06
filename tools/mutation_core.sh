#!/usr/bin/env bash
# Mutation testing of the whole compute core (`make mutation`): each module below with the unit tests that cover
# it, one after the other through tools/mutation.sh; prints one summary line per module and writes them, with the
# survivors, to out/mutation/. About 3 h on an idle 2-core machine with MUTATION_JOBS=2, an hour of it
# audit/embeddings.py (1805 mutants): not in CI. tools/mutation_recheck.sh reruns a module's survivors against its
# whole test files. Figures and the survivors' reasons: docs/testing.md ("Mutation testing with a tool").
#   tools/mutation_core.sh               every module
#   tools/mutation_core.sh verdicts      only the entries whose module path contains "verdicts"
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
u=tests/unit
heldout=(  # the held-out copy tests without the one that trains an autoencoder (10 s a mutant)
  "$u/test_heldout_copies.py::test_training_presets_hold_none_of_the_heldout_families"
  "$u/test_heldout_copies.py::test_detector_training_can_only_choose_transform_bounds_presets"
  "$u/test_heldout_copies.py::test_every_heldout_copy_differs_from_its_source"
  "$u/test_heldout_copies.py::test_every_heldout_copy_is_closest_to_its_own_source"
  "$u/test_heldout_copies.py::test_heldout_copies_stay_within_each_image_range"
  "$u/test_heldout_copies.py::test_heldout_copies_repeat_with_the_same_seed_and_change_with_another"
  "$u/test_heldout_copies.py::test_heldout_families_copy_volumes_through_the_same_code"
)
detector_transforms=(  # test_detector.py's transform tests, not its 47 s training test
  "$u/test_detector.py::test_transforms_repeat_with_the_same_seed_and_differ_with_another"
  "$u/test_detector.py::test_sampled_copy_parameters_stay_within_their_bounds"
  "$u/test_detector.py::test_transform_with_every_parameter_off_returns_the_images"
  "$u/test_detector.py::test_a_90_degree_rotation_is_rot90_and_a_flip_mirrors_the_last_axis"
  "$u/test_detector.py::test_rotation_is_in_pixel_units_on_a_non_square_image"
  "$u/test_detector.py::test_blur_keeps_a_constant_image_constant"
  "$u/test_detector.py::test_transform_bounds_reject_a_probability_above_one"
)
simulation_harness=(  # test_statistics_simulation.py's run_audit checks, not its coverage studies (15 s a mutant)
  "$u/test_statistics_simulation.py::test_the_simulation_harness_gives_run_audit_figures"
  "$u/test_statistics_simulation.py::test_planted_samples_stay_out_of_the_headline"
  "$u/test_statistics_simulation.py::test_fewer_than_ten_evaluation_patients_get_a_warning"
  "$u/test_statistics_simulation.py::test_fewer_than_100_generated_samples_get_a_warning"
)
deid_tests="$u/test_formats.py $u/test_ingest_plan.py $u/test_deidentify_mutants.py"
# audit/embeddings.py without _RayEngine (Ray: the integration tests' part); track_audit against a real sqlite
# MLflow store and moto S3 (test_track_audit.py, about 10 s a mutant)
e=raymem.audit.embeddings
embedding_mutants="$(printf "$e.xǁ%sǁ*__mutmut_* " EmbeddingSource PhaseClock _LocalSet _LocalEngine Subset _Sets)$(
  printf "$e.x_%s__mutmut_* " _fixed_dim _require_unique _progress_bar evaluation_split read_inputs plant_embeddings \
    read_planted search_against_train pairs_above expected_pairs_above run_audit _search planted_figures _pair_row \
    _plant audit_metrics audit_warnings _label_figures matches_table _lists write_outputs numeric_items \
    audit_embeddings track_audit)"
# audit/images.py without audit_images, _ingest_synthetic and detector_heldout_accuracy (Ray Data ingest and
# embedding, a trained LDM) and audit_report (their outputs): the integration tests' part
i=raymem.audit.images
image_mutants="$(printf "$i.x_%s__mutmut_* " _is_dataset synthetic_as_dataset synthetic_ingest_config \
  generator_training_set plant_copies images_by_id clear_outputs filter_copies)"
# module | mutants (mutmut names; empty: all of the module's) | test files and node ids
core=(
  "raymem/audit/statistics.py||$u/test_seed_statistics.py $u/test_audit_reference.py $u/test_verdicts.py
   $u/test_metrics.py $u/test_statistics_simulation.py $u/test_memorized_rate_jackknife.py
   $u/test_statistics_mutants.py"
  "raymem/audit/verdicts.py||$u/test_verdicts.py $u/test_verdicts_mutants.py"
  "raymem/audit/metrics.py||$u/test_metrics.py $u/test_audit_reference.py $u/test_sweep_rules.py
   $u/test_metrics_mutants.py"
  "raymem/audit/embeddings.py|$embedding_mutants|$u/test_embeddings_mutants.py $u/test_audit_reference.py
   $u/test_metrics.py $u/test_track_audit.py"
  "raymem/audit/quality.py||$u/test_quality.py $u/test_quality_reference.py $u/test_quality_mutants.py"
  "raymem/audit/accuracy.py||$u/test_accuracy.py $u/test_heldout_accuracy.py
   $u/test_accuracy_mutants.py"
  "raymem/models/copy_transforms.py||${detector_transforms[*]} ${heldout[*]} $u/test_copy_transforms_mutants.py"
  "raymem/data/transforms.py||$u/test_transforms.py $u/test_dicom_real.py ${heldout[*]} $u/test_transforms_mutants.py"
  "raymem/data/formats.py|raymem.data.formats.x_pseudonymize__mutmut_* raymem.data.formats.x_pseudonym_key_from_env__mutmut_*
   raymem.data.formats.x_patient_key_from_path__mutmut_*|$deid_tests"
  "raymem/data/ingest.py|raymem.data.ingest.x__keyed_digest__mutmut_* raymem.data.ingest.x_safe_source__mutmut_*
   raymem.data.ingest.x_path_patients__mutmut_* raymem.data.ingest.x_layout_warnings__mutmut_*|$deid_tests"
  "raymem/search/kernel.py||$u/test_kernel.py $u/test_kernel_mutants.py"
  "raymem/audit/images.py|$image_mutants|$u/test_images_mutants.py"
  "raymem/audit/report.py||$u/test_report.py $u/test_audit_reference.py $u/test_report_mutants.py"
  "raymem/audit/simulation.py||$u/test_simulation_mutants.py ${simulation_harness[*]}"
)
mkdir -p out/mutation
summary=out/mutation/summary.txt
: > "$summary"
for entry in "${core[@]}"; do
  IFS='|' read -r module mutants tests <<< "$(tr '\n' ' ' <<< "$entry")"
  [[ $# -eq 0 || $module == *"$1"* ]] || continue
  name=$(basename "$module" .py)
  # shellcheck disable=SC2086  # the test list is words by design
  MUTANTS="$mutants" MUTATION_JOBS="${MUTATION_JOBS:-1}" tools/mutation.sh "$module" $tests \
    | tee "out/mutation/$name.txt" | tail -1 | tee -a "$summary"
done
echo "summary: $summary; survivors per module: out/mutation/<module>.txt"
