from __future__ import annotations

import pytest

from service.settings import Settings, SettingsError


def test_defaults_are_valid():
    s = Settings.from_env({})
    assert s.max_batch_size == 64 and s.runtime == "onnx" and s.trace_requests is False


def test_values_are_parsed_by_type():
    s = Settings.from_env({"CLF_MAX_BATCH_SIZE": "8", "CLF_MAX_QUEUE_DELAY_MS": "2.5",
                           "CLF_TRACE_REQUESTS": "yes", "PATH": "/bin"})
    assert (s.max_batch_size, s.max_queue_delay_ms, s.trace_requests) == (8, 2.5, True)


@pytest.mark.parametrize("env, words", [
    ({"CLF_MAX_BATCH_SIZE": "many"}, "CLF_MAX_BATCH_SIZE='many' is not a valid int"),
    ({"CLF_MAX_BATCH_SIZE": "0"}, "CLF_MAX_BATCH_SIZE must be in 1..4096"),
    ({"CLF_PROVIDERS": "tpu"}, "CLF_PROVIDERS must be auto, cpu or cuda"),
    ({"CLF_WORKERS": "0"}, "CLF_WORKERS must be >= 1"),
    ({"CLF_TRACE_REQUESTS": "maybe"}, "CLF_TRACE_REQUESTS='maybe'"),
    ({"CLF_BATCH": "3"}, "unknown setting CLF_BATCH"),
    ({"CLF_IMAGE_MODEL": ""}, "CLF_IMAGE_MODEL and CLF_TEXT_MODEL are both empty"),
    ({"CLF_MAX_TEXTS_PER_REQUEST": "0"}, "CLF_MAX_TEXTS_PER_REQUEST must be >= 1"),
    ({"CLF_MAX_BATCH_TOKENS": "8"}, "CLF_MAX_BATCH_TOKENS must be >= 16"),
    ({"CLF_MAX_PADDING_FRACTION": "1.5"}, "CLF_MAX_PADDING_FRACTION must be in"),
    ({"CLF_SOLO_THREADS": "-1"}, "CLF_SOLO_THREADS must be >= 0"),
    ({"CLF_LOG_GROUP_WAIT_MS": "500"}, "CLF_LOG_GROUP_WAIT_MS must be in"),
    ({"CLF_MAX_BODY_BYTES": "300000000"}, "CLF_MAX_BUFFERED_BYTES must be >= CLF_MAX_BODY_BYTES"),
    ({"CLF_LOG_PG_JOURNAL": "true", "CLF_LOG_SPOOL_DIR": ""},
     "CLF_LOG_PG_JOURNAL=true needs CLF_LOG_SPOOL_DIR (the journal is the spool)"),
    ({"CLF_LOG_PG_JOURNAL": "true", "CLF_LOG_INDEX_MS": "0"}, "and CLF_LOG_INDEX_MS > 0"),
    ({"CLF_LOG_SPOOL_MAX_MB": "-1"}, "CLF_LOG_SPOOL_MAX_MB must be >= 0 (0 = no bound)"),
])
def test_bad_values_stop_with_a_message_naming_the_variable(env, words):
    with pytest.raises(SettingsError, match=words.replace("(", r"\(").replace(")", r"\)")):
        Settings.from_env(env)


def test_a_text_model_alone_is_enough():
    s = Settings.from_env({"CLF_IMAGE_MODEL": "", "CLF_TEXT_MODEL": "lang-transformer:latest"})
    assert (s.image_model, s.text_model, s.max_texts_per_request) == ("", "lang-transformer:latest", 64)


def test_ort_threads_split_the_cores_between_workers(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert Settings.from_env({"CLF_WORKERS": "2"}).ort_threads == 4
    assert Settings.from_env({"CLF_WORKERS": "16"}).ort_threads == 1
    assert Settings.from_env({"CLF_INTRA_OP_THREADS": "3"}).ort_threads == 3


def test_the_solo_session_takes_the_cores_this_process_may_use_at_most_four(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert Settings.from_env({}).solo_session_threads == 2
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert Settings.from_env({}).solo_session_threads == 4
    assert Settings.from_env({"CLF_SOLO_THREADS": "1"}).solo_session_threads == 1  # none


def test_the_logged_settings_hold_no_secret():
    """The start-up log line printed a PostgreSQL prediction log's URL whole, password too."""
    s = Settings.from_env({"CLF_PREDICTION_LOG": "postgresql://clf:s3cret@db:5432/clf",
                           "CLF_FEEDBACK_TOKEN": "t0ken"})
    logged = repr(s.to_dict())
    assert "s3cret" not in logged and "t0ken" not in logged
    assert s.to_dict()["prediction_log"] == "postgresql://clf:***@db:5432/clf"
    assert s.prediction_log == "postgresql://clf:s3cret@db:5432/clf"  # what the server uses


def test_advice_on_queue_bounds_that_start_but_likely_miss_what_was_meant():
    assert Settings.from_env({}).advice({}) == []
    raised = {"CLF_MAX_QUEUE_ITEMS": "512"}
    (line,) = Settings.from_env(raised).advice(raised)
    assert "CLF_MAX_QUEUE_ITEMS=512 is set and CLF_MAX_QUEUE_REQUESTS is not" in line
    assert "at most 64 requests" in line and "(e.g. 449," in line
    both = {"CLF_MAX_QUEUE_ITEMS": "512", "CLF_MAX_QUEUE_REQUESTS": "256"}
    assert Settings.from_env(both).advice(both) == []
    lowered = {"CLF_MAX_QUEUE_ITEMS": "32"}  # below a request of 64 inputs
    (line,) = Settings.from_env(lowered).advice(lowered)
    assert line.startswith("CLF_MAX_QUEUE_ITEMS=32 is below the most inputs a request may carry "
                           "(64,")
    fits = {"CLF_MAX_QUEUE_ITEMS": "32", "CLF_MAX_IMAGES_PER_REQUEST": "16",
            "CLF_MAX_TEXTS_PER_REQUEST": "32"}
    assert Settings.from_env(fits).advice(fits) == []
    text_only = {"CLF_MAX_QUEUE_ITEMS": "32", "CLF_MAX_TEXTS_PER_REQUEST": "16",
                 "CLF_IMAGE_MODEL": "", "CLF_TEXT_MODEL": "lang-transformer"}
    assert Settings.from_env(text_only).advice(text_only) == []  # no image model: its max
