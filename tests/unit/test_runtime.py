"""How much of Ray's output a run shows: quiet by default, everything with -v / RAYMEM_VERBOSE (no cluster started)."""

from __future__ import annotations

import logging
import os

import pytest
import yaml

from raymem import runtime


@pytest.mark.parametrize(("value", "expected"), [(None, False), ("", False), ("0", False), ("false", False),
                                                 ("1", True), ("yes", True)])
def test_verbose_follows_the_environment(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv(runtime.VERBOSE_ENV, raising=False)
    else:
        monkeypatch.setenv(runtime.VERBOSE_ENV, value)
    assert (runtime.verbose(), runtime.train_log_level()) == (expected, "INFO" if expected else "WARNING")


@pytest.fixture
def data_context():
    from ray.data import DataContext

    context = DataContext.get_current()
    saved = (context.enable_progress_bars, context.enable_operator_progress_bars, context.print_on_execution_start)
    yield context
    context.enable_progress_bars, context.enable_operator_progress_bars, context.print_on_execution_start = saved


def _console_levels() -> list[int]:
    from ray.data._internal.logging import SessionFileHandler

    return [h.level for h in logging.getLogger("ray.data").handlers if not isinstance(h, SessionFileHandler)]


def test_quiet_by_default_turns_off_ray_datas_bars_and_console_info(monkeypatch, data_context):
    monkeypatch.delenv(runtime.VERBOSE_ENV, raising=False)
    data_context.enable_progress_bars = data_context.print_on_execution_start = True
    runtime.quiet_ray_output()
    levels = _console_levels()
    assert (data_context.enable_progress_bars, data_context.enable_operator_progress_bars,
            data_context.print_on_execution_start) == (False, False, False)
    assert levels and all(level >= logging.WARNING for level in levels)


def test_verbose_leaves_ray_datas_output_alone(monkeypatch, data_context):
    monkeypatch.setenv(runtime.VERBOSE_ENV, "1")
    data_context.enable_progress_bars = data_context.print_on_execution_start = True
    runtime.quiet_ray_output()
    assert (data_context.enable_progress_bars, data_context.print_on_execution_start) == (True, True)


def test_local_workers_get_ray_datas_own_logging_config_with_the_console_at_warning(monkeypatch):
    from ray.data._internal.logging import DEFAULT_CONFIG

    monkeypatch.delenv("RAY_DATA_LOGGING_CONFIG", raising=False)
    monkeypatch.delenv("RAY_DATA_DISABLE_PROGRESS_BARS", raising=False)
    runtime._quiet_local_workers()
    with open(os.environ["RAY_DATA_LOGGING_CONFIG"]) as file:
        written = yaml.safe_load(file)
    assert os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] == "1"
    assert written["handlers"]["console"]["level"] == "WARNING"
    assert {**written["handlers"], "console": DEFAULT_CONFIG["handlers"]["console"]} == DEFAULT_CONFIG["handlers"]


@pytest.mark.parametrize(("value", "expected"), [("", max(4, 2 * (os.cpu_count() or 2))), ("6", 6), (" 1 ", 1)])
def test_a_local_cluster_gets_twice_the_cores_or_raymem_local_cpus(monkeypatch, value, expected):
    monkeypatch.setenv("RAYMEM_LOCAL_CPUS", value)
    assert runtime.local_cpus() == expected


@pytest.mark.parametrize("value", ["0", "-2", "2.5", "many"])
def test_a_bad_raymem_local_cpus_names_the_variable(monkeypatch, value):
    monkeypatch.setenv("RAYMEM_LOCAL_CPUS", value)
    with pytest.raises(ValueError, match=f"RAYMEM_LOCAL_CPUS: .*got '{value}'"):
        runtime.local_cpus()
