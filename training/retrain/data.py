"""Step 2: what a retraining learns from and is judged on, the three sources of data.

``locate_sources`` checks the paths the run was given (``Sources``); ``gather_data`` gathers, for
the champion (step 1, ``champion.py``), a ``RetrainData``:
  * ``original``: the champion's own data source, subsampled and split exactly as its training
    run did (same limit, seed and fractions), so its test split is data the champion never saw;
  * ``traffic``: logged inputs with a ground-truth label (``PredictionLog.labelled_inputs``),
    split by time (``split_by_time``), so nothing the challenger learns from is newer than what
    it is judged on: the newest rows (``holdout_newest``, a share, or all rows logged after a
    ``cutoff`` time) are held out; only rows logged at or before the cutoff whose label was
    stored by then may train (a label that came later is used for nothing); those go to
    train/val by a hash of the request id (all inputs of a request together);
  * ``new``: a folder of images (one sub-folder per class) or a CSV/TSV/JSONL file of texts,
    assigned to train/val/test by a hash of each input's content (duplicates land together).
Hash assignment uses the recipe's val/test fractions: it is stable as the data grows. The
traffic's cutoff, its rule and row counts go into the audit record (``TrafficSplit``).

Every check that can refuse the run happens here, before anything is trained or written:
unknown labels, empty or unreadable files, inputs the service's preprocessing rejects.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

from preprocessing import InputError, decode_image, decode_text, normalize_text

from ..data import IMAGE_SUFFIXES, DataError
from .champion import Champion, RetrainError

DEFAULT_LOG = "artifacts/predictions.db"
SOURCES = ("original", "traffic", "new")
PARTS = ("train", "val", "test")
TEXT_SUFFIXES = (".csv", ".tsv", ".jsonl")
Input = Union[bytes, str]  # image file bytes, or a text


@dataclass(frozen=True)
class Pool:
    """Labelled inputs with where each came from; labels index the champion's labels."""

    inputs: tuple[Input, ...] = ()
    labels: tuple[int, ...] = ()
    names: tuple[str, ...] = ()  # for messages: a file, ``request <id> item <i>``, ``file:line``
    sources: tuple[str, ...] = ()
    tags: tuple[Mapping[str, str], ...] = ()  # request tags (traffic only)

    def __len__(self) -> int:
        return len(self.inputs)

    def __add__(self, other: "Pool") -> "Pool":
        return Pool(*(a + b for a, b in zip(dataclasses.astuple(self),
                                            dataclasses.astuple(other))))

    def select(self, keep: Sequence[bool]) -> "Pool":
        return Pool(*(tuple(v for v, k in zip(column, keep) if k)
                      for column in dataclasses.astuple(self)))


@dataclass(frozen=True)
class TrafficSplit:
    """How the labelled traffic was split by time (``split_by_time``): rows logged at or before
    ``cutoff`` (unix seconds) whose label was stored by then may train (``train`` indices, train
    and val together); rows logged after it are ``held_out``; older rows whose label came after
    the cutoff (``late``) are used for nothing. ``cutoff`` None: no rows held out and no cutoff
    (``holdout_newest`` 0 without ``--cutoff``, or no traffic)."""

    cutoff: float | None
    rule: str  # "newest 20%", "--cutoff", "none"
    train: tuple[int, ...] = ()
    held_out: tuple[int, ...] = ()
    late: tuple[int, ...] = ()
    newest_train: float | None = None  # logged time of the newest training row
    oldest_held_out: float | None = None  # logged time of the oldest held-out row
    # The cutoff the champion was retrained with (its manifest's), and how many held-out rows
    # are not newer than it: the champion may have trained on those (which favours it, never
    # the challenger).
    champion_cutoff: float | None = None
    held_out_champion_may_know: int = 0

    def describe(self) -> dict[str, Any]:
        """What the audit record says about it (times in ISO 8601, UTC)."""
        return {"cutoff": _iso(self.cutoff), "cutoff_ts": self.cutoff, "rule": self.rule,
                "rows": {"train": len(self.train), "held_out": len(self.held_out),
                         "late_feedback": len(self.late)},
                "newest_train": _iso(self.newest_train),
                "oldest_held_out": _iso(self.oldest_held_out),
                "champion_cutoff": _iso(self.champion_cutoff),
                "held_out_champion_may_know": self.held_out_champion_may_know}


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="milliseconds")


def split_by_time(times: Sequence[float], feedback_times: Sequence[float],
                  holdout_newest: float = 0.2, cutoff: float | None = None) -> TrafficSplit:
    """Split rows by their logged ``times``: the held-out part is every row logged after the
    cutoff, and the cutoff is ``cutoff`` if given, else the instant just before the oldest of the
    newest ``ceil(holdout_newest * n)`` rows (rows logged at that same instant are held out with
    it). Training may use rows logged at or before the cutoff whose label was stored
    (``feedback_times``) at or before it too. So every training row is at least as old as the
    cutoff and every held-out row is newer: max(train times) <= cutoff < min(held-out times)."""
    if not 0.0 <= holdout_newest <= 1.0:
        raise ValueError(f"holdout_newest must be in [0, 1], got {holdout_newest}")
    order = sorted(range(len(times)), key=lambda i: times[i])
    rule = "--cutoff" if cutoff is not None else f"newest {holdout_newest * 100:g}%"
    if cutoff is None:
        n_held = math.ceil(holdout_newest * len(order) - 1e-9)
        if n_held <= 0:
            return TrafficSplit(None, "none", train=tuple(order),
                                newest_train=times[order[-1]] if order else None)
        cutoff = math.nextafter(times[order[len(order) - n_held]], -math.inf)
    train = tuple(i for i in order if times[i] <= cutoff and feedback_times[i] <= cutoff)
    late = tuple(i for i in order if times[i] <= cutoff and not feedback_times[i] <= cutoff)
    held = tuple(i for i in order if times[i] > cutoff)
    return TrafficSplit(cutoff, rule, train, held, late,
                        newest_train=max((times[i] for i in train), default=None),
                        oldest_held_out=min((times[i] for i in held), default=None))


@dataclass(frozen=True)
class RetrainData:
    """The challenger's train and val parts and the held-out ``test`` part both models face;
    ``traffic_split``: how the traffic was split by time (None: no prediction log)."""

    train: Pool
    val: Pool
    test: Pool
    labels: tuple[str, ...]
    traffic_split: TrafficSplit | None = None

    def counts(self) -> dict[str, dict[str, int]]:
        """source -> part -> number of inputs."""
        return {source: {part: getattr(self, part).sources.count(source) for part in PARTS}
                for source in SOURCES}

    def data_hash(self) -> str:
        """sha256 over the sorted (label, sha256(input)) pairs of all parts, as training's
        ``data_hash`` does for one data set: independent of order."""
        pairs = sorted(f"{self.labels[label]}\t{hashlib.sha256(_as_bytes(x)).hexdigest()}"
                       for part in (self.train, self.val, self.test)
                       for x, label in zip(part.inputs, part.labels))
        return hashlib.sha256("\n".join(pairs).encode()).hexdigest()


def _as_bytes(x: Input) -> bytes:
    return x if isinstance(x, bytes) else x.encode("utf-8")


def hash_part(key: str, val_fraction: float, test_fraction: float) -> str:
    """``train``, ``val`` or ``test`` for a key, from its sha256: deterministic, and the same
    answer however many other keys there are."""
    u = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64
    if u < test_fraction:
        return "test"
    return "val" if u < test_fraction + val_fraction else "train"


def split_by_hash(pool: Pool, keys: Sequence[str], val_fraction: float,
                  test_fraction: float) -> dict[str, Pool]:
    parts = [hash_part(k, val_fraction, test_fraction) for k in keys]
    return {part: pool.select([p == part for p in parts]) for part in PARTS}


@dataclass(frozen=True)
class Sources:
    """Where the new examples come from: the prediction log (None: no traffic) and
    ``--new-data`` (None: none)."""

    log: Path | str | None  # a SQLite file or a postgresql:// URL
    new_data: Path | None


def locate_sources(log: str | None, new_data: str | None) -> Sources:
    """The log to read traffic from (the one given, which must exist, or ``DEFAULT_LOG`` if it
    exists) and the new data (which must exist if given)."""
    from monitoring.store import is_postgres

    if log is None:
        log_path = Path(DEFAULT_LOG) if Path(DEFAULT_LOG).is_file() else None
    elif is_postgres(log):
        log_path = log  # a shared PostgreSQL log: checked when it is read
    elif not Path(log).is_file():
        raise RetrainError(f"--log {log}: no such prediction log")
    else:
        log_path = Path(log)
    new_path = None if new_data is None else Path(new_data)
    if new_path is not None and not new_path.exists():
        raise RetrainError(f"--new-data {new_path}: no such file or folder")
    return Sources(log_path, new_path)


def gather_data(champion: Champion, sources: Sources, since: float = 0.0,
                until: float = math.inf, holdout_newest: float = 0.2,
                cutoff: float | None = None) -> RetrainData:
    """All three sources, checked and split (see the module docstring): the traffic logged in
    ``[since, until)`` split by time at ``cutoff`` or with its newest ``holdout_newest`` share
    held out."""
    recipe = champion.recipe()
    # The user's inputs first: their mistakes are the likely ones, and cheap to find.
    new = None if sources.new_data is None else new_pool(champion, sources.new_data, recipe)
    traffic = None if sources.log is None else traffic_pool(champion, sources.log, since, until)
    original = original_parts(champion, recipe)
    keyed: dict[str, Pool] = {part: Pool() for part in PARTS}
    if new is not None:
        for part, chosen in split_by_hash(*new, recipe.val_fraction,
                                          recipe.test_fraction).items():
            keyed[part] = keyed[part] + chosen
    split = None
    if traffic is not None:
        pool, keys, times, feedback_times = traffic
        split = split_by_time(times, feedback_times, holdout_newest, cutoff)
        known = (champion.manifest.get("retrain") or {}).get("traffic_split") or {}
        if isinstance(known.get("cutoff_ts"), (int, float)):
            split = dataclasses.replace(
                split, champion_cutoff=float(known["cutoff_ts"]),
                held_out_champion_may_know=sum(times[i] <= known["cutoff_ts"]
                                               for i in split.held_out))
        trains = set(split.train)
        # Older rows: train or val by hash (val only steers early stopping); newest: held out.
        for part, chosen in split_by_hash(pool.select([i in trains for i in range(len(pool))]),
                                          [k for i, k in enumerate(keys) if i in trains],
                                          recipe.val_fraction, 0.0).items():
            keyed[part] = keyed[part] + chosen
        held = set(split.held_out)
        keyed["test"] = keyed["test"] + pool.select([i in held for i in range(len(pool))])
    return RetrainData(*(original[p] + keyed[p] for p in PARTS), labels=champion.labels,
                       traffic_split=split)


def original_parts(champion: Champion, recipe: Any) -> dict[str, Pool]:
    """The champion's data, subsampled and split as its training run did."""
    try:
        if champion.kind == "image":
            from ..train import prepare_splits

            splits, _ = prepare_splits(recipe)
            parts = {p: getattr(splits, p) for p in PARTS}
            inputs = {p: parts[p].blobs for p in PARTS}
        else:
            from ..text.data import check_texts, stratified_split
            from ..text.train import base_spec, load_data

            data = load_data(recipe)
            check_texts(data, base_spec(recipe))
            splits = stratified_split(data, recipe.seed, recipe.val_fraction,
                                      recipe.test_fraction)
            parts = {p: getattr(splits, p) for p in PARTS}
            inputs = {p: parts[p].texts for p in PARTS}
    except (DataError, OSError) as exc:
        raise RetrainError(f"the original data of {champion.tag} "
                           f"({champion.manifest['data_source']}) cannot be read: {exc}") from None
    classes = parts["train"].classes
    if tuple(classes) != champion.labels:
        raise RetrainError(f"the original data of {champion.tag} "
                           f"({champion.manifest['data_source']}) now has classes "
                           f"{list(classes)}; the model knows {list(champion.labels)}")
    return {p: Pool(tuple(inputs[p]), tuple(parts[p].labels), tuple(parts[p].names),
                    ("original",) * len(inputs[p]), ({},) * len(inputs[p])) for p in PARTS}


def traffic_pool(champion: Champion, log_path: Path | str, since: float, until: float
                 ) -> tuple[Pool, list[str], list[float], list[float]]:
    """The champion's name's labelled traffic, oldest first, with each row's request id (which
    places it in train or val), logged time and the time its label was stored."""
    from monitoring.store import open_log

    try:
        with open_log(log_path) as log:
            rows = log.labelled_inputs(champion.name, since, until)
    except Exception as exc:  # noqa: BLE001 - sqlite3/RuntimeError: not a log we can read
        raise RetrainError(f"cannot read the prediction log {log_path}: {exc}") from None
    _check_labels(champion, [r.label for r in rows], f"the feedback in {log_path}")
    index = {label: i for i, label in enumerate(champion.labels)}
    inputs, names = [], []
    for row in rows:
        name = f"{log_path}: request {row.request_id} item {row.item}"
        inputs.append(_checked_input(champion, row.input, name))
        names.append(name)
    pool = Pool(tuple(inputs), tuple(index[r.label] for r in rows), tuple(names),
                ("traffic",) * len(rows), tuple(dict(r.slices) for r in rows))
    return (pool, [r.request_id for r in rows], [r.ts for r in rows],
            [r.feedback_ts for r in rows])


def new_pool(champion: Champion, path: Path, recipe: Any) -> tuple[Pool, list[str]]:
    """``--new-data``: a class-per-sub-folder image folder, or a text file; keys are content
    hashes."""
    if champion.kind == "image":
        items = _image_folder(path)
    else:
        items = _text_file(path, recipe)
    _check_labels(champion, [label for _, label, _ in items], f"the new data {path}")
    index = {label: i for i, label in enumerate(champion.labels)}
    inputs = [_checked_input(champion, x, name) for x, _, name in items]
    pool = Pool(tuple(inputs), tuple(index[label] for _, label, _ in items),
                tuple(name for _, _, name in items), ("new",) * len(items), ({},) * len(items))
    return pool, [hashlib.sha256(_as_bytes(x)).hexdigest() for x in inputs]


def _image_folder(root: Path) -> list[tuple[bytes, str, str]]:
    """(bytes, class name, path) for every image under ``root/<class>/``. Unlike training's
    ``folder_images`` one class is enough: new data may be more examples of a single label."""
    if not root.is_dir():
        raise RetrainError(f"--new-data {root}: an image model takes a folder with one "
                           "sub-folder of images per class")
    items = []
    current = root
    try:
        for class_dir in sorted(p for p in root.iterdir()
                                if p.is_dir() and not p.name.startswith(".")):
            current = class_dir
            for file in sorted(class_dir.iterdir()):
                if (file.is_file() and not file.name.startswith(".")
                        and file.suffix.lower() in IMAGE_SUFFIXES):
                    current = file
                    items.append((file.read_bytes(), class_dir.name, str(file)))
    except OSError as exc:
        raise RetrainError(f"--new-data: cannot read {current}: {exc.strerror}") from None
    if not items:
        raise RetrainError(f"--new-data {root} holds no images: put them in one sub-folder per "
                           f"class ({', '.join(IMAGE_SUFFIXES)})")
    return items


def _text_file(path: Path, recipe: Any) -> list[tuple[str, str, str]]:
    """(text, label, file:line) for every row of a CSV/TSV/JSONL file, read as training reads
    one (the champion's text and label column names)."""
    from ..text.data import read_texts

    if not path.is_file() or path.suffix.lower() not in TEXT_SUFFIXES:
        raise RetrainError(f"--new-data {path}: a text model takes one "
                           f"{'/'.join(TEXT_SUFFIXES)} file")
    try:
        data = read_texts(path, recipe.text_column, recipe.label_column)
    except DataError as exc:
        raise RetrainError(f"--new-data: {exc}") from None
    except OSError as exc:
        raise RetrainError(f"--new-data {path}: cannot read it: {exc.strerror}") from None
    return [(text, data.classes[label], name)
            for text, label, name in zip(data.texts, data.labels, data.names)]


def _check_labels(champion: Champion, labels: Sequence[str], where: str) -> None:
    unknown = sorted(set(labels) - set(champion.labels))
    if unknown:
        raise RetrainError(f"{where} has label(s) {unknown} that {champion.tag} does not know "
                           f"(its labels: {list(champion.labels)}); a retraining keeps the "
                           "model's labels: drop those rows or train a new model")


def _checked_input(champion: Champion, raw: Input, name: str) -> Input:
    """The input as the model takes it (bytes for images, str for texts), once the service's
    own preprocessing accepts it; a bad one is named, not skipped."""
    try:
        if champion.kind == "image":
            decode_image(_as_bytes(raw), champion.spec)
            return raw
        text = decode_text(raw) if isinstance(raw, bytes) else raw
        normalize_text(text, champion.spec)
        return text
    except InputError as exc:
        raise RetrainError(f"{name}: {exc.message}") from None
