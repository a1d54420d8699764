"""The service's one settings object, read from ``CLF_*`` environment variables and validated once.

A bad value stops start-up with a message naming the variable, rather than surfacing later as a
strange failure under load.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from monitoring.slices import SliceRules

PREFIX = "CLF_"


class SettingsError(ValueError):
    """A configuration mistake; the message names the variable and what it accepts."""


@dataclass(frozen=True)
class Settings:
    # Which models to serve: a BentoML model tag; "" disables. A bare name (or name:production)
    # serves the production version (modelstore/registry.py; the latest when none is set) and
    # follows it when it is promoted (hot reload); "name:version" pins one version. One service
    # serves both side by side (each with its own session and batcher); at least one.
    image_model: str = "digits-cnn"
    text_model: str = ""
    # Workers (processes). Each has its own ONNX Runtime session and batcher. Two beat one on a
    # 2-core box (each event loop parses requests while the other worker's model runs).
    workers: int = 2
    # Adaptive batching: the largest batch, and how long the oldest queued item may wait for
    # company once the model is free (0 = dispatch as soon as the model is free).
    max_batch_size: int = 64
    max_queue_delay_ms: float = 0.0
    # Overload (per model, per worker). max_queue_requests bounds the requests a worker has
    # admitted and not yet answered, max_queue_items their inputs: a request is counted from
    # before its body is read (as one item, then as its inputs once the body is parsed) until
    # the answer is built, so decoding, the batch queue, the model call and the answer are all
    # inside them. A request beyond either is answered 503 `overloaded` with Retry-After at
    # once, before its body is read (and one whose inputs would pass max_queue_items, once its
    # body is parsed, unless nothing else is held). By Little's law an admitted request then
    # spends about what is held / (the worker's answers per second) in the server: that, not
    # the batch queue alone, is what bounds an accepted request's latency. The requests' default
    # comes from the benchmark's overload cell (tools/bench/overload.py, 1,000 connections of
    # one-image requests on 2 cores) and its normal-load cells: one max_batch_size of requests
    # per worker is enough to keep the model busy (a call's inputs are read and decoded while the
    # previous call runs) and never refuses the normal-load cells (up to 64 connections, which
    # the kernel may all hand one worker); twice that only doubled the accepted requests'
    # latency under the flood, and half of it refused requests at normal load. The items'
    # default is that plus one request of the most inputs (CLF_MAX_IMAGES_PER_REQUEST and
    # CLF_MAX_TEXTS_PER_REQUEST, 64), so such a request fits beside others: with a single bound
    # of 64 items, a 64-image request was refused 70-80% of the time beside 8 connections of
    # one-image requests (tools/bench/bigbody.py); 256 let a flood of 64-image requests hold
    # four a worker, and the small requests beside them waited 1.7-2.6x longer (p99) than with
    # the single bound, against 1.0-1.5x with 128. 0 = no bound.
    max_queue_requests: int = 64
    max_queue_items: int = 128
    # The default deadline of a classify request, from when the service takes it (0 = none). An
    # item still queued when its deadline passes is dropped before inference (never computed
    # for nobody) and answered 504 `deadline_exceeded`; while the queue's wait is over half the
    # deadline, new requests are refused 503 at the door instead (they would likely be dropped
    # after costing their decode). A client may shorten it per request (header
    # X-Request-Deadline-Ms), never lengthen it. It caps what max_queue_items cannot: a slow
    # model, whose max_queue_items of work would take seconds. The default leaves a healthy
    # queue alone (the benchmark's overload cell drops nothing) and keeps answers inside a
    # typical 2 s client timeout.
    request_deadline_ms: float = 1000.0
    # ONNX Runtime. "auto" = CUDA when the installed onnxruntime has it, else CPU.
    providers: str = "auto"
    intra_op_threads: int = 0  # 0 = cores // workers
    # A lone request on an otherwise idle server may run on a second session of a small model
    # with this many threads (runtime.py, workerboard.py); 0 = the cores (at most 4), 1 = none.
    solo_threads: int = 0
    # "onnx" runs the model; "noop" answers zeros and exists to measure the request path's floor.
    runtime: str = "onnx"
    # Request limits. max_header_bytes bounds a request's head (request line and headers):
    # uvicorn's httptools parser has no bound and buffers a header's value whole, so one client
    # sending a 300 MB header grew a worker by 530 MB. 64 KiB is far over what a client or a
    # gateway sends (nginx refuses heads over 32 KiB by default) and holds a large JWT.
    max_header_bytes: int = 64 * 1024
    max_body_bytes: int = 20 * 1024 * 1024
    # The request bodies a worker holds at once (being read, or read and not yet answered):
    # bodies are read before admission (a slow upload holds none), so without this bound 60
    # connections sending 19 MB each grew a worker by 1.1 GB, and a thousand would exhaust the
    # host's memory. A request beyond it is answered 503 overloaded.
    max_buffered_bytes: int = 256 * 1024 * 1024
    max_images_per_request: int = 64
    max_image_pixels: int = 40_000_000
    max_texts_per_request: int = 64
    # Text batching: the cap on one model call's padded size (texts x longest length, in tokens),
    # and the largest share of that call's token slots that may be padding (see batching.py).
    max_batch_tokens: int = 8192
    max_padding_fraction: float = 0.25
    top_k: int = 3
    # Monitoring. The prediction log: every answer is durable here before it is sent; "" turns
    # logging off. A file path is SQLite (WAL; the workers and replicas of one host share the
    # file); a postgresql://user:pass@host/db URL is PostgreSQL, shared by replicas on any host.
    prediction_log: str = "artifacts/predictions.db"
    log_synchronous: str = "NORMAL"  # SQLite: FULL fsyncs each commit (power-loss durable, slower)
    log_pool_size: int = 4  # PostgreSQL: connections per worker (the writer, feedback, reports)
    # PostgreSQL: while the server takes no writes (down, restarting, failing over, unreachable),
    # each worker appends the records of its answers to a spool file in this folder on the
    # replica's own disk and keeps answering; a thread replays the spool into the database once
    # it takes writes again, exactly once (service/recording.py). "" = no spool: requests are
    # answered 503 log_unavailable while the database is away.
    log_spool_dir: str = "artifacts/predictions-spool"
    # The most the spool folder may hold (MiB, all its files): past it, answers are refused 503
    # log_unavailable rather than fill the replica's disk through a long outage; 0 = no bound.
    log_spool_max_mb: int = 2048
    # PostgreSQL: true = an answer's records are made durable by one append to its worker's spool
    # file, and a thread indexes the spool into the database every CLF_LOG_INDEX_MS, as SQLite's
    # journal does: the database has them up to that interval later (until then they live on the
    # replica's disk only). false = each answer waits for a commit of its records.
    log_pg_journal: bool = False
    # Group commit: while other requests are on their way to the log, a commit waits for them up
    # to this long, so that several answers share one commit's fixed cost (service/recording.py).
    # A lone request never waits; 0 commits whatever is ready at once.
    log_group_wait_ms: float = 2.0
    # SQLite: each worker makes an answer's records durable by appending them to a journal file
    # of its own and indexes the journal into the database every this many milliseconds
    # (monitoring/journal.py; reads through the log always see the journals' rows too).
    # 0 = no journal: each answer waits for a commit of its records (the group commit above).
    log_index_ms: float = 100.0
    # The name each logged row carries for the server that answered (the slice tag "replica" in
    # reports over a shared log); "" = the host name.
    replica: str = ""
    # Store each input's raw bytes (image file, UTF-8 text) with its record, so labelled traffic
    # can be retrained on (training/retrain/); inputs over the byte cap are not stored.
    log_inputs: bool = True
    log_input_max_bytes: int = 1024 * 1024
    # Share of requests whose inputs are kept (chosen by a hash of the request id, so all
    # inputs of a request go together): under heavy image traffic 1.0 grows the log by tens of
    # GB an hour (see README, Monitoring). See `python -m monitoring prune` for retention.
    log_input_sample: float = 1.0
    # Ground-truth feedback (POST /v1/feedback) needs "Authorization: Bearer <token>"; "" disables
    # the route (403 saying so).
    feedback_token: str = ""
    # Slice tags a request may carry (header X-Slices: key=value;...): "device=ios|android|web;
    # region" allows device with three values (others fold into "other") and free region values,
    # at most slice_max_values distinct per key across the whole log.
    slice_keys: str = ""
    slice_max_values: int = 20
    # How often each worker re-reads the drift report's latest scores (drift_latest.json next to
    # the log) into its clf_drift_* gauges; 0 = never.
    drift_refresh_s: float = 15.0
    # The OOD flag's input-feature signal (monitoring/ood.py): it needs each input's monitored
    # features, which an image computes for it even with the prediction log off (~70 us for a
    # 64x64 PNG on 2 shared cores); false leaves the signal out (the flags then miss more of a
    # foreign domain: letters sent to the digits model 80% instead of 93%).
    ood_input_features: bool = True
    # Hot reload: how often each worker checks the production pointer of a model named without
    # a version (CLF_IMAGE_MODEL=digits-cnn); 0 = never. A pinned "name:version" never reloads.
    reload_interval_s: float = 2.0
    # Serving (the host and port are bentoml serve's --host and --port).
    warmup_batches: int = 3
    request_timeout_s: float = 60.0
    # Stopping (SIGTERM): the bound on a graceful stop. Requests already on their way are
    # answered and logged within it (new connections get 503 shutting_down meanwhile), and
    # `bentoml serve` has exited 0 by then; a worker still busy at the bound is killed. The
    # default fits Kubernetes' 30 s termination grace period.
    drain_timeout_s: float = 25.0
    # Listening: each worker listens on a socket of its own bound to the same host and port
    # (SO_REUSEPORT), and the kernel hands each new connection to one of them by a hash of its
    # addresses. With one shared socket (false) a connection goes to whichever worker accepts
    # first, so a few long-lived keep-alive connections (a proxy's, a load balancer's) can all
    # land on one worker, which then serves them all while the others idle (see listeners.py).
    # Linux only: where SO_REUSEPORT is missing the workers share one socket, and the log says so.
    reuseport: bool = True
    log_level: str = "INFO"
    # "json": every log line one JSON object (service/logformat.py), for log collectors that
    # split on newlines; "text": BentoML's format.
    log_format: str = "text"
    trace_requests: bool = False
    # A classify request admitted at the door skips the ASGI layers that do nothing for it
    # (service/lane.py): BentoML's request metrics and timeout stay; false = BentoML's whole stack.
    fast_lane: bool = True

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        """Build from ``CLF_<FIELD>`` variables; unknown ``CLF_`` variables are an error too."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        known = {f.name: f for f in fields(cls)}
        for key, raw in env.items():
            if not key.startswith(PREFIX):
                continue
            name = key[len(PREFIX):].lower()
            if name not in known:
                raise SettingsError(
                    f"unknown setting {key}; known: {', '.join(PREFIX + n.upper() for n in known)}"
                )
            values[name] = _parse(key, raw, type(getattr(cls, name)))
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        checks = [
            (self.workers >= 1, "CLF_WORKERS must be >= 1"),
            (1 <= self.max_batch_size <= 4096, "CLF_MAX_BATCH_SIZE must be in 1..4096"),
            (0 <= self.max_queue_delay_ms <= 1000, "CLF_MAX_QUEUE_DELAY_MS must be in 0..1000"),
            (self.max_queue_items >= 0, "CLF_MAX_QUEUE_ITEMS must be >= 0 (0 = no bound)"),
            (self.max_queue_requests >= 0, "CLF_MAX_QUEUE_REQUESTS must be >= 0 (0 = no bound)"),
            (0 <= self.request_deadline_ms <= 3_600_000,
             "CLF_REQUEST_DEADLINE_MS must be in 0..3600000 (0 = no deadline)"),
            (self.providers in ("auto", "cpu", "cuda"), "CLF_PROVIDERS must be auto, cpu or cuda"),
            (self.intra_op_threads >= 0, "CLF_INTRA_OP_THREADS must be >= 0 (0 = automatic)"),
            (self.solo_threads >= 0, "CLF_SOLO_THREADS must be >= 0 (0 = the cores, 1 = off)"),
            (self.runtime in ("onnx", "noop"), "CLF_RUNTIME must be onnx or noop"),
            (self.log_format in ("text", "json"), "CLF_LOG_FORMAT must be text or json"),
            (self.max_body_bytes >= 1024, "CLF_MAX_BODY_BYTES must be >= 1024"),
            (self.max_header_bytes >= 4096, "CLF_MAX_HEADER_BYTES must be >= 4096"),
            (self.max_buffered_bytes >= self.max_body_bytes,
             "CLF_MAX_BUFFERED_BYTES must be >= CLF_MAX_BODY_BYTES (one whole body must fit)"),
            (self.max_images_per_request >= 1, "CLF_MAX_IMAGES_PER_REQUEST must be >= 1"),
            (self.max_image_pixels >= 64, "CLF_MAX_IMAGE_PIXELS must be >= 64"),
            (self.max_texts_per_request >= 1, "CLF_MAX_TEXTS_PER_REQUEST must be >= 1"),
            (self.max_batch_tokens >= 16, "CLF_MAX_BATCH_TOKENS must be >= 16"),
            (0 <= self.max_padding_fraction < 1, "CLF_MAX_PADDING_FRACTION must be in [0, 1)"),
            (self.top_k >= 1, "CLF_TOP_K must be >= 1"),
            (self.log_synchronous.upper() in ("NORMAL", "FULL"),
             "CLF_LOG_SYNCHRONOUS must be NORMAL or FULL"),
            (self.log_pool_size >= 1, "CLF_LOG_POOL_SIZE must be >= 1"),
            (0.0 <= self.log_group_wait_ms <= 100.0, "CLF_LOG_GROUP_WAIT_MS must be in [0, 100]"),
            (0.0 <= self.log_index_ms <= 60_000.0, "CLF_LOG_INDEX_MS must be in [0, 60000]"),
            (self.log_spool_max_mb >= 0, "CLF_LOG_SPOOL_MAX_MB must be >= 0 (0 = no bound)"),
            (not self.log_pg_journal or (bool(self.log_spool_dir) and self.log_index_ms > 0),
             "CLF_LOG_PG_JOURNAL=true needs CLF_LOG_SPOOL_DIR (the journal is the spool) and "
             "CLF_LOG_INDEX_MS > 0"),
            ("://" not in self.prediction_log
             or self.prediction_log.startswith(("postgresql://", "postgres://")),
             "CLF_PREDICTION_LOG must be a file path (SQLite) or a postgresql:// URL"),
            (len(self.replica) <= 64, "CLF_REPLICA must be at most 64 characters"),
            (self.log_input_max_bytes >= 0, "CLF_LOG_INPUT_MAX_BYTES must be >= 0"),
            (0.0 <= self.log_input_sample <= 1.0, "CLF_LOG_INPUT_SAMPLE must be in [0, 1]"),
            (self.slice_max_values >= 1, "CLF_SLICE_MAX_VALUES must be >= 1"),
            (self.drift_refresh_s >= 0, "CLF_DRIFT_REFRESH_S must be >= 0 (0 = off)"),
            (self.reload_interval_s >= 0, "CLF_RELOAD_INTERVAL_S must be >= 0 (0 = off)"),
            (self.warmup_batches >= 0, "CLF_WARMUP_BATCHES must be >= 0"),
            (self.request_timeout_s > 0, "CLF_REQUEST_TIMEOUT_S must be > 0"),
            (1 <= self.drain_timeout_s <= 3600, "CLF_DRAIN_TIMEOUT_S must be in 1..3600"),
            (bool(self.image_model or self.text_model),
             "CLF_IMAGE_MODEL and CLF_TEXT_MODEL are both empty: set at least one to a model store "
             "tag (e.g. CLF_IMAGE_MODEL=digits-cnn, CLF_TEXT_MODEL=lang-transformer)"),
        ]
        for ok, message in checks:
            if not ok:
                raise SettingsError(message)
        self.slice_rules()  # a malformed CLF_SLICE_KEYS stops start-up too

    def advice(self, environ: Mapping[str, str] | None = None) -> list[str]:
        """Settings that start but likely do not do what was meant, each a line for the start-up
        log (a warning). ``environ`` says which were set (``CLF_<FIELD>`` present)."""
        env = os.environ if environ is None else environ
        given = {k[len(PREFIX):].lower() for k in env if k.startswith(PREFIX)}
        most = max([self.max_images_per_request] * bool(self.image_model)
                   + [self.max_texts_per_request] * bool(self.text_model), default=1)
        out = []
        default_items = type(self).max_queue_items
        if ("max_queue_items" in given and "max_queue_requests" not in given
                and self.max_queue_items > default_items and self.max_queue_requests):
            out.append(
                f"CLF_MAX_QUEUE_ITEMS={self.max_queue_items} is set and CLF_MAX_QUEUE_REQUESTS is "
                f"not: a worker still holds at most {self.max_queue_requests} requests, whatever "
                "their inputs (before the requests' bound, CLF_MAX_QUEUE_ITEMS alone bounded "
                "one-input requests too); to hold more of them set CLF_MAX_QUEUE_REQUESTS as well "
                f"(e.g. {max(1, self.max_queue_items - most + 1)}, which leaves room for a request "
                f"of {most} inputs beside them)")
        if self.max_queue_items and self.max_queue_items < most:
            out.append(
                f"CLF_MAX_QUEUE_ITEMS={self.max_queue_items} is below the most inputs a request may "
                f"carry ({most}, CLF_MAX_IMAGES_PER_REQUEST / CLF_MAX_TEXTS_PER_REQUEST): such a "
                "request is admitted only while its worker holds nothing else, and refused 503 "
                "beside any other; raise CLF_MAX_QUEUE_ITEMS or lower the per-request maximum")
        return out

    def slice_rules(self) -> "SliceRules":
        from monitoring.slices import SliceError, SliceRules

        try:
            return SliceRules.parse(self.slice_keys, self.slice_max_values)
        except SliceError as exc:
            raise SettingsError(f"CLF_SLICE_KEYS={self.slice_keys!r}: {exc}") from None

    @property
    def ort_threads(self) -> int:
        if self.intra_op_threads:
            return self.intra_op_threads
        return max(1, (os.cpu_count() or 1) // self.workers)

    @property
    def solo_session_threads(self) -> int:
        """0: the cores this process may run on, at most 4 (a call short enough to run inline
        gains little from more threads; only 2 cores were measured)."""
        if self.solo_threads:
            return self.solo_threads
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cores = os.cpu_count() or 1
        return min(cores, 4)

    def to_dict(self) -> dict[str, Any]:
        """The settings as logged at start-up: the feedback token is masked, and so is the
        password of a PostgreSQL prediction log's URL (it was logged whole)."""
        from monitoring.store import display_target

        out = asdict(self)
        if out["feedback_token"]:
            out["feedback_token"] = "***"
        out["prediction_log"] = display_target(self.prediction_log)
        return out


def _parse(key: str, raw: str, kind: type) -> Any:
    try:
        if kind is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        return kind(raw)
    except ValueError:
        raise SettingsError(f"{key}={raw!r} is not a valid {kind.__name__}") from None
