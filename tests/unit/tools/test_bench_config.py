"""The bench's options: defaults for a full run, --quick for CI, and refusals."""

from __future__ import annotations

import pytest

from tools.bench.config import parse_config

pytestmark = pytest.mark.tools  # the benchmark tool's own tests (fast; in `make test`)


def test_full_run_defaults_match_the_peers_methodology() -> None:
    cfg = parse_config([])
    assert cfg.concs == cfg.floor_concs == (1, 16, 64)
    assert (cfg.warmup_s, cfg.duration_s) == (5.0, 20.0)
    assert cfg.raw_batches == (1, 8, 32, 64)
    from service.settings import Settings

    assert cfg.workers == Settings().workers  # the service's default (CLF_WORKERS unset in tests)


def test_quick_is_short_and_floors_only_the_top_concurrency() -> None:
    cfg = parse_config(["--quick"])
    assert cfg.concs == (1, 16) and cfg.floor_concs == (16,)
    assert cfg.duration_s <= 2 and cfg.retries == 0


def test_options_override_and_skip_floor() -> None:
    cfg = parse_config(["--conc", "64", "--workers", "2", "--skip-floor", "--providers", "cpu"])
    assert (cfg.concs, cfg.floor_concs, cfg.workers, cfg.providers) == ((64,), (), 2, "cpu")


def test_the_configured_workers_are_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLF_WORKERS", "3")
    assert parse_config([]).workers == 3


def test_a_bad_service_setting_stops_the_bench_with_its_message(monkeypatch) -> None:
    monkeypatch.setenv("CLF_WORKERS", "zero")
    with pytest.raises(SystemExit, match="CLF_WORKERS"):
        parse_config([])


@pytest.mark.parametrize("bad", ["0", "1,x", ""])
def test_bad_concurrency_lists_are_refused(bad: str) -> None:
    with pytest.raises(SystemExit):
        parse_config(["--conc", bad])


def test_every_task_by_default_and_one_on_request() -> None:
    assert parse_config([]).tasks == ("image", "text", "overload")
    assert parse_config(["--task", "text"]).tasks == ("text",)
    assert parse_config(["--task", "overload"]).tasks == ("overload",)
    with pytest.raises(SystemExit):
        parse_config(["--task", "audio"])


def test_prediction_log_cells_at_the_loaded_concurrencies() -> None:
    assert parse_config([]).log_concs == (16, 64)
    assert parse_config(["--quick"]).log_concs == (16,)
    assert parse_config(["--conc", "1,8"]).log_concs == (8,)
    assert parse_config(["--skip-log"]).log_concs == ()


def test_the_overload_cell_is_1000_connections_for_30_s_between_normal_load() -> None:
    cfg = parse_config(["--task", "overload"])
    assert (cfg.overload_conns, cfg.overload_duration_s, cfg.overload_normal_conc) == (1000, 30, 64)
    assert parse_config(["--quick"]).overload_duration_s == 5
    with pytest.raises(SystemExit):
        parse_config(["--overload-conns", "0"])


def test_retry_budget_scales_with_the_tasks() -> None:
    assert parse_config(["--task", "image"]).budget_s * 2 == parse_config([]).budget_s
    assert parse_config(["--budget", "10"]).budget_s == 10


def test_text_mix_options_are_checked() -> None:
    cfg = parse_config(["--text-bodies", "64", "--short-share", "0.5"])
    assert (cfg.text_bodies, cfg.text_short_share) == (64, 0.5)
    for bad in (["--text-bodies", "1"], ["--short-share", "1.5"]):
        with pytest.raises(SystemExit):
            parse_config(bad)


def test_the_benchs_own_variables_are_not_taken_for_service_settings(monkeypatch) -> None:
    monkeypatch.setenv("CLF_BENCH_WRK_CPU", "0-1")
    assert parse_config([]).workers >= 1  # the service would refuse an unknown CLF_ name


def test_the_cpu_breakdown_counts_one_thread_per_call_on_cuda() -> None:
    from tools.bench.sections import cpu_threads_per_call, served_threads

    cpu, cuda = parse_config(["--providers", "cpu"]), parse_config(["--providers", "cuda"])
    gpu_box = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert cpu_threads_per_call(cpu, gpu_box) == served_threads(cpu)
    assert cpu_threads_per_call(cuda, gpu_box) == 1
    auto = parse_config(["--providers", "auto"])
    assert cpu_threads_per_call(auto, gpu_box) == 1
    assert cpu_threads_per_call(auto, ["CPUExecutionProvider"]) == served_threads(auto)
