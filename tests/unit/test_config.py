"""Typed configs: a bad value names its field and what it accepts."""

import pytest

from raymem import config


def test_yaml_values_and_overrides_are_validated_together(tmp_path):
    path = tmp_path / "ingest.yaml"
    path.write_text("spatial_dims: 3\nsize: 32\nval_fraction: 0.2\n")

    cfg = config.load(config.IngestConfig, str(path), {"seed": 5, "format": None})

    assert (cfg.size, cfg.val_fraction, cfg.seed, cfg.format) == ((32, 32, 32), 0.2, 5, "auto")


@pytest.mark.parametrize(("values", "field"), [
    ({"val_fraction": 0.9}, "val_fraction"),
    ({"size": [2, 64]}, "size"),
    ({"spatial_dims": 4}, "spatial_dims"),
    ({"patient_pattern": "([^/]+)/"}, "patient_pattern"),
    ({"sizes": [64, 64]}, "sizes"),
])
def test_a_bad_value_names_the_field(values, field):
    with pytest.raises(config.ConfigError, match=rf"\b{field}\b"):
        config.validate(config.IngestConfig, values)


def test_audit_percentile_range_is_stated():
    with pytest.raises(config.ConfigError, match=r"percentile: Input should be less than 100"):
        config.validate(config.AuditConfig, {"percentile": 100})


def test_a_yaml_file_that_is_not_a_mapping_is_refused(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("- just\n- a list\n")

    with pytest.raises(config.ConfigError, match="mapping"):
        config.load(config.AuditConfig, str(path))


def test_an_ldm_trains_on_the_train_or_the_test_split_only():
    with pytest.raises(config.ConfigError, match=r"\bsplit\b"):
        config.validate(config.LDMTrainConfig, {"dataset": "d", "out": "o", "split": "val"})


@pytest.mark.parametrize("values", [{}, {"use_gpu": True}, {"use_gpu": True, "num_workers": 2}, {"num_workers": 1}])
def test_cuda_graphs_need_one_gpu_worker(values):
    # DDP's gradient hooks cannot be captured in a CUDA graph, and there is no graph without a GPU
    with pytest.raises(config.ConfigError, match="cuda_graphs: needs use_gpu"):
        config.validate(config.LDMTrainConfig, {"dataset": "d", "out": "o", "cuda_graphs": True, **values})


def test_cuda_graphs_with_one_gpu_worker_are_accepted():
    cfg = config.validate(config.LDMTrainConfig, {"dataset": "d", "out": "o", "cuda_graphs": True, "use_gpu": True,
                                                         "num_workers": 1})
    assert cfg.cuda_graphs and not config.validate(config.LDMTrainConfig, {"dataset": "d", "out": "o"}).cuda_graphs
