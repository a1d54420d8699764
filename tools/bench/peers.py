"""The peers section (``--peers``): this service and Triton serve the same ONNX file, same wire,
same wrk, same cells, same CPU accounting, one after the other, and one table compares them.

The file is the peers benchmark's (``../shared/peers-bench``: its ``setup.sh`` exports it to
``$PEERS_ROOT/model.onnx`` and builds the request bodies and the servers' virtual environments;
the section says what is missing and how to make it, and measures nothing without it). This
service serves it after ``training.import_onnx`` (weights byte-identical, logits identical under
ONNX Runtime); Triton is the harness's own server (``servers/pytriton_server.py``: Triton 2.51
from nvidia-pytriton, dynamic batching, 2 ms queue delay, max batch 64), and FastAPI/uvicorn
(one worker, no batching, ``servers/fastapi_server.py``) is the lone-request yardstick.

Cells, each at every ``--conc``:

- Triton, the harness's own body: the v2 binary tensor extension, one [1,3,64,64] FP32 tensor
  (49,152 B) after its JSON header, JSON logits back;
- this service, the same tensor the same way (``POST /v2/models/{name}/infer``, asking for the
  ``probabilities`` output in JSON instead of ``logits``: the header is 10 bytes longer);
- this service, a 64x64 RGB PNG upload through ``/v1/classify/image`` (what users send: decode
  and the shared preprocessing included; Triton has no equivalent);
- the same two with the prediction log on (the default), at the loaded concurrencies;
- FastAPI with raw float32 bytes.

With ``--providers cuda`` every server's session is on the CUDA provider: this service's as
configured, the peers' through ``peer_provider.py`` (same session options, CUDA first), and
Triton runs twice, with ORT's default cuDNN search (EXHAUSTIVE: searched again at each new batch
size) and with the HEURISTIC one; x Triton is taken over the faster of the two.

``--peers-runs N`` repeats the whole set N times (servers interleaved within a run), and the
table gives each figure as min-max over the runs; the ratio to Triton is taken within each run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .bodies import V2_INFER_ROUTE, Body, noise_png, write_image_body
from .cells import Cell, Check, bench_served
from .config import REPO_ROOT
from .cpu import CpuUse, CpuWindow, ProcessTree, least_contaminated
from .predlog import temp_log
from .raw import RAW_CONFIGS, best_cell, expected_probabilities
from .report import fmt, markdown_table, ratio
from .sections import Run, expected_answer, raw_section
from .server import ServerError, ServerSpec, stop_tree
from .wrk import run_wrk

MODEL_NAME = "peers-resnet"
DEFAULT_HARNESS = REPO_ROOT.parent / "shared" / "peers-bench"
OCTET = "Content-Type: application/octet-stream"
# How long a peer may take to answer its first request (Triton starts tritonserver and the
# python-backend stub first; 10-20 s on the 2-core box).
PEER_START_S = float(os.environ.get("CLF_BENCH_PEER_START_S", "180"))


class PeersMissing(RuntimeError):
    """The peers' harness, model, bodies or environments are not there."""


@dataclass(frozen=True)
class Harness:
    """The peers' harness folder and its ``$PEERS_ROOT`` (venvs, model, bodies)."""

    dir: Path
    root: Path

    @classmethod
    def locate(cls, harness: Path | None = None, root: Path | None = None) -> "Harness":
        return cls(Path(harness or os.environ.get("CLF_BENCH_PEERS_DIR") or DEFAULT_HARNESS),
                   Path(root or os.environ.get("PEERS_ROOT") or "/tmp/peers"))

    @property
    def model(self) -> Path:
        return self.root / "model.onnx"

    @property
    def bodies(self) -> Path:
        return self.root / "bodies"

    def python(self, venv: str) -> Path:
        return self.root / f"venv-{venv}" / "bin" / "python"

    def check(self, venvs: Sequence[str]) -> None:
        needed = [self.dir / "servers", self.model, self.root / "model.ref.npz",
                  self.bodies / "triton.bin", self.bodies / "raw.bin",
                  *(self.python(v) for v in venvs)]
        missing = [str(p) for p in needed if not p.exists()]
        if missing:
            raise PeersMissing(f"the peers' harness is not set up (missing: {', '.join(missing)});"
                               f" run `bash {self.dir}/setup.sh` first (about 5 min; "
                               f"PEERS_ROOT={self.root})")


def numpy_major(python: Path) -> int | None:
    """The major version of the numpy ``python`` imports (None: none, or it does not run)."""
    try:
        out = subprocess.run([str(python), "-c", "import numpy; print(numpy.__version__)"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    head = out.stdout.strip().split(".")[0]
    return int(head) if out.returncode == 0 and head.isdigit() else None


def check_numpy(harness: Harness, peer: "PeerSpec") -> None:
    """Refuse a peer whose environment imports a numpy it cannot serve with (``PeerSpec.
    numpy_below``), before minutes of start-up timeouts say it less clearly."""
    if peer.numpy_below is None:
        return
    python = harness.python(peer.venv)
    major = numpy_major(python)
    if major is not None and major >= peer.numpy_below:
        raise PeersMissing(
            f"{peer.label}: {python} imports numpy {major}.x; it needs numpy < "
            f"{peer.numpy_below} (PyTriton 0.7.0 answers every request HTTP 500 'output tensor "
            f"shape does not match size of output' under numpy 2). Give it an environment whose "
            f"site-packages hold numpy<{peer.numpy_below} only, as `setup.sh` builds")


@dataclass(frozen=True)
class PeerSpec:
    key: str
    label: str
    venv: str
    script: str
    route: str
    body: str  # a file of $PEERS_ROOT/bodies
    stats_name: str  # common.BatchStats' name
    wire: str
    needs_libdir: bool = False  # the python-backend stub must find the venv's libpython
    cuda_algo: str = "EXHAUSTIVE"  # on CUDA: the provider's cudnn_conv_algo_search
    cuda_only: bool = False  # a configuration that only differs on CUDA
    numpy_below: int | None = None  # the numpy major version its environment must stay under


PEERS = {
    "triton": PeerSpec("triton", "Triton 2.51 via PyTriton (dynamic batching)", "triton",
                       "servers/pytriton_server.py", "/v2/models/resnet/infer", "triton.bin",
                       "pytriton", "v2 binary FP32 tensor", needs_libdir=True, numpy_below=2),
    # On CUDA, Triton a second time with the cuDNN search a user tunes when the batcher's calls
    # change size (ORT's default, EXHAUSTIVE, searches again at every new batch size).
    "triton-heuristic": PeerSpec("triton-heuristic", "Triton 2.51 via PyTriton, cuDNN heuristic",
                                 "triton", "servers/pytriton_server.py", "/v2/models/resnet/infer",
                                 "triton.bin", "pytriton", "v2 binary FP32 tensor",
                                 needs_libdir=True, cuda_algo="HEURISTIC", cuda_only=True,
                                 numpy_below=2),
    "fastapi": PeerSpec("fastapi", "FastAPI/uvicorn (1 worker, no batching)", "base",
                        "servers/fastapi_server.py", "/predict", "raw.bin", "fastapi",
                        "raw float32 bytes"),
}
TRITONS = ("triton", "triton-heuristic")  # x Triton is over the faster of these in the run
LAUNCHER = Path(__file__).resolve().parent / "peer_provider.py"


def peer_command(harness: Harness, peer: PeerSpec, port: int, providers: str
                 ) -> tuple[list[str], dict[str, str]]:
    """The peer's command line and extra environment: the harness's server as it is (CPU), or
    through ``peer_provider.py`` with its session on the CUDA provider."""
    cmd = [str(harness.python(peer.venv)), peer.script, "--port", str(port)]
    if providers != "cuda":
        return cmd, {}
    return ([cmd[0], str(LAUNCHER), *cmd[1:]],
            {"PEERS_ORT_PROVIDER": "cuda", "PEERS_CUDNN_CONV_ALGO_SEARCH": peer.cuda_algo})


def py_libdir(python: Path) -> str:
    out = subprocess.run([str(python), "-c", "import sysconfig;print(sysconfig.get_config_var("
                          "'LIBDIR'))"], capture_output=True, text=True, timeout=60)
    return out.stdout.strip()


def peer_body(harness: Harness, peer: PeerSpec) -> Body:
    path = harness.bodies / peer.body
    headers = [OCTET]
    if peer.body == "triton.bin":
        headers.append("Inference-Header-Content-Length: "
                       + (harness.bodies / "triton.hdrlen").read_text().strip())
    return Body(path=path, headers=headers, route=peer.route,
                description=f"{peer.wire}, {path.stat().st_size:,} B")


def tensor_body(harness: Harness, work_dir: Path, model: str) -> tuple[Body, np.ndarray]:
    """Triton's body for this service: the same tensor bytes, ``probabilities`` asked for."""
    x = np.ascontiguousarray(np.load(harness.root / "model.ref.npz")["x"][:1], dtype="<f4")
    raw = x.tobytes()
    header = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "outputs": [{"name": "probabilities",
                                      "parameters": {"binary_data": False}}]}).encode()
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / f"{model}-v2-tensor.bin"
    path.write_bytes(header + raw)
    return Body(path=path, headers=[OCTET, f"Inference-Header-Content-Length: {len(header)}"],
                route=V2_INFER_ROUTE.format(name=model),
                description=f"v2 binary FP32 tensor, {path.stat().st_size:,} B"), x[0]


def json_tensor_body(harness: Harness, work_dir: Path, model: str) -> Body:
    """The same tensor as ``tensor_body``'s in a v2 JSON body: its 12,288 numbers in ``data``
    (nested as the shape, as KServe's and tritonclient's JSON clients send them), as written by
    ``json.dumps`` (shortest round-trip digits of each float32 as a double)."""
    x = np.ascontiguousarray(np.load(harness.root / "model.ref.npz")["x"][:1], dtype="<f4")
    doc = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                  "data": x.tolist()}],
                      "outputs": [{"name": "probabilities"}]}).encode()
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / f"{model}-v2-json.json"
    path.write_bytes(doc)
    return Body(path=path, headers=["Content-Type: application/json"],
                route=V2_INFER_ROUTE.format(name=model),
                description=f"v2 JSON FP32 tensor, {len(doc):,} B")


@dataclass
class PeerCell:
    """A peer's cell: what ``Cell`` has that a peer can give (no /metrics histograms)."""

    conc: int
    wrk: Any
    cpu: CpuUse
    items_per_batch: float | None
    wrk_output: str
    noise_per_attempt: list[float] = field(default_factory=list)
    contaminated: bool = False

    @property
    def rps(self) -> float:
        return self.wrk.ok_per_s

    @property
    def server_cpu_ms_per_request(self) -> float | None:
        return self.cpu.server_cpu_s * 1e3 / self.wrk.requests if self.wrk.requests else None

    def to_dict(self) -> dict:
        return {"conc": self.conc, "rps": round(self.rps, 2), "requests": self.wrk.requests,
                "p50_ms": self.wrk.p("50"), "p99_ms": self.wrk.p("99"),
                "errors": self.wrk.errors, "items_per_batch": self.items_per_batch,
                "server_cpu_ms_per_request": self.server_cpu_ms_per_request,
                "cpu": self.cpu.to_dict(), "noise_per_attempt": self.noise_per_attempt,
                "contaminated": self.contaminated, "wrk_output": self.wrk_output}


def batch_histogram(stats_dir: Path) -> Counter:
    """Model calls per batch size, summed over the files the peer's processes dump."""
    total: Counter = Counter()
    for path in stats_dir.glob("*.json"):
        try:
            total.update({int(k): v for k, v in json.loads(path.read_text()).items()})
        except (OSError, ValueError):
            pass  # being replaced right now; the next read has it
    return total


def mean_batch(before: Counter, after: Counter) -> float | None:
    calls = {n: after[n] - before.get(n, 0) for n in after}
    count = sum(calls.values())
    return sum(n * c for n, c in calls.items()) / count if count else None


def find_logits(obj: Any, classes: int) -> list | None:
    """The first list of ``classes`` numbers in a JSON answer (each peer answers its own way)."""
    if isinstance(obj, list) and len(obj) == classes and all(
            isinstance(v, (int, float)) for v in obj):
        return obj
    for value in (obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list) else ()):
        found = find_logits(value, classes)
        if found is not None:
            return found
    return None


def bench_peer(harness: Harness, peer: PeerSpec, run: Run, concs: Sequence[int], port: int,
               tag: str, providers: str = "cpu") -> dict:
    """Start one peer server from its harness, check its logits against the torch reference,
    measure each concurrency as this service's cells are measured; always stop it."""
    body = peer_body(harness, peer)
    stats_dir = run.work_dir / f"stats-{tag}"
    shutil.rmtree(stats_dir, ignore_errors=True)
    stats_dir.mkdir(parents=True)
    env = dict(os.environ, PEERS_STATS_DIR=str(stats_dir), PEERS_ROOT=str(harness.root),
               PEERS_MODEL=str(harness.model), PYTHONUNBUFFERED="1")
    if peer.needs_libdir:
        env["LD_LIBRARY_PATH"] = py_libdir(harness.python(peer.venv))
    cmd, extra = peer_command(harness, peer, port, providers)
    env.update(extra)
    result: dict = {"server": peer.key, "label": peer.label, "body": body.description,
                    "providers": providers, "cells": []}
    if providers == "cuda":
        result["cudnn_conv_algo_search"] = peer.cuda_algo
    log_path = run.work_dir / f"server-{tag}.log"
    proc = tree = None
    url = f"http://127.0.0.1:{port}{peer.route}"
    try:
        t0 = time.monotonic()
        with open(log_path, "wb") as logf:
            proc = subprocess.Popen(cmd, cwd=harness.dir, env=env, stdout=logf,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        tree = ProcessTree(proc.pid)
        run.log(f"  [{tag}] pid {proc.pid}: {' '.join(cmd[1:])}")
        answer = _wait_answer(proc, url, body, log_path, timeout_s=PEER_START_S)
        result["startup_s"] = round(time.monotonic() - t0, 2)
        want = np.load(harness.root / "model.ref.npz")["y"][0]
        got = find_logits(answer, len(want))
        if got is None or float(np.abs(np.asarray(got) - want).max()) > 1e-4:
            raise ServerError(f"{peer.key} answered {answer}; expected the logits {want.tolist()}")
        result["processes"] = len(tree.refresh())
        run.log(f"  [{tag}] ready in {result['startup_s']} s, logits checked, "
                f"{result['processes']} processes")
        plan = run.plan()

        def measure(conc: int) -> tuple[PeerCell, CpuUse]:
            run_wrk(url, body, conc, plan.warmup_s, latency=False)
            time.sleep(1.0)
            before = batch_histogram(stats_dir)
            window = CpuWindow(tree)
            wrk, output = run_wrk(url, body, conc, plan.duration_s, latency=True)
            cpu = window.close()
            time.sleep(1.0)  # the stats files are rewritten twice a second
            return PeerCell(conc, wrk, cpu, mean_batch(before, batch_histogram(stats_dir)),
                            output), cpu

        for conc in concs:
            attempts = least_contaminated(lambda: measure(conc), what=f"{tag} c={conc}",
                                          retries=plan.retries, quiet_wait=plan.quiet_wait_s,
                                          may_retry=plan.may_retry, log=run.log)
            cell = attempts.best
            cell.noise_per_attempt, cell.contaminated = (attempts.noise_per_attempt,
                                                         attempts.contaminated)
            run.log(f"  [{tag}] c={conc:3d} {cell.rps:7.1f} req/s  p50={fmt(cell.wrk.p('50'))} ms"
                    f"  p99={fmt(cell.wrk.p('99'))} ms  items/batch={fmt(cell.items_per_batch)}"
                    f"  errors={cell.wrk.errors}  srv={cell.cpu.server_cores:.2f} cores  "
                    f"foreign+steal={cell.cpu.noise:.2f}{' !' if cell.contaminated else ''}")
            result["cells"].append(cell)
    except Exception as exc:  # noqa: BLE001 - recorded; the other servers still run
        result["error"] = f"{type(exc).__name__}: {exc}"
        run.log(f"  [{tag}] FAILED: {result['error']}")
    finally:
        left = stop_tree(proc, tree, run.log)
        if left:
            run.log(f"  [{tag}] could not stop PIDs {left}; stop them by hand")
    return result


def _wait_answer(proc: subprocess.Popen, url: str, body: Body, log_path: Path,
                 timeout_s: float, failures: int = 3) -> Any:
    """POST the body until the peer answers 200 (the harness's own readiness test). Connection
    errors and 4xx (a model still loading) are waited out; ``failures`` 5xx answers in a row
    are the server's verdict on the request and end the wait (on a GPU lease, PyTriton's 500s
    under numpy 2 would otherwise cost the whole timeout, twice)."""
    data = body.path.read_bytes()
    deadline = time.monotonic() + timeout_s
    last, errors = "no answer", 0
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerError(f"exited with rc={proc.returncode} during start-up:\n"
                              + log_path.read_text(errors="replace")[-2000:])
        request = urllib.request.Request(url, data=data, method="POST")
        for header in body.headers:
            key, _, value = header.partition(":")
            request.add_header(key.strip(), value.strip())
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}: {exc.read()[:300]!r}"
            errors = errors + 1 if exc.code >= 500 else 0
            if errors >= failures:
                raise ServerError(f"answered {last} {errors} times in a row") from None
        except (OSError, ValueError) as exc:
            last, errors = repr(exc)[:200], 0
        time.sleep(0.5)
    raise ServerError(f"not answering after {timeout_s:.0f} s: {last}")


def ensure_imported(harness: Harness, log: Callable[[str], None]):
    """The peers' file in this model store (``training.import_onnx`` in a child process, so
    onnx/torch never load into the bench), reused while its sha256 matches the file's."""
    import sys

    from modelstore.artifact import ArtifactError, load_artifact
    from modelstore.store import file_sha256

    from .store import has_model

    source_sha = file_sha256(harness.model)
    if has_model(f"{MODEL_NAME}:latest"):
        artifact = load_artifact(f"{MODEL_NAME}:latest")
        if artifact.read_json("export.json").get("source_sha256") == source_sha:
            return artifact
    log(f"  [store] importing {harness.model} as {MODEL_NAME} (python -m training.import_onnx)")
    proc = subprocess.run([sys.executable, "-m", "training.import_onnx", str(harness.model),
                           "--name", MODEL_NAME], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0:
        raise ArtifactError(f"importing {harness.model} failed (rc={proc.returncode}):\n"
                            + (proc.stdout + proc.stderr)[-3000:])
    return load_artifact(f"{MODEL_NAME}:latest")


@dataclass(frozen=True)
class Row:
    """One line of the peers table: a server, its wire and whether it logs."""

    key: str
    server: str
    wire: str
    log: str  # "on" / "off" / "-" (the peers have none)


def run_peers(run: Run, results: dict) -> None:
    cfg = run.cfg
    harness = Harness.locate(cfg.peers_dir, cfg.peers_root)
    section: dict = results.setdefault("peers", {"runs": []})
    section["harness"] = {"dir": str(harness.dir), "root": str(harness.root)}
    run.heading(f"Peers: the same ONNX file served by Triton and by this service "
                f"({harness.model}, providers={cfg.providers})")
    harness.check([p.venv for p in PEERS.values()])
    for key in TRITONS:
        check_numpy(harness, PEERS[key])
    artifact = ensure_imported(harness, run.log)
    section["model"] = {"tag": f"{artifact.name}:{artifact.version}",
                        **{k: v for k, v in artifact.read_json("export.json").items()
                           if k in ("source", "source_sha256", "weights_sha256", "opset",
                                    "max_abs_diff", "embedding_from")}}
    run.log(f"{artifact.name}:{artifact.version}: {harness.model} imported (weights identical, "
            f"logits max |diff| {section['model'].get('max_abs_diff')})")
    run.heading("Raw ONNX Runtime on the peers' file (the c=1 yardstick: batch 1)")
    raw = raw_section(run, artifact, configs=RAW_CONFIGS, batches=(1, 64))
    best = best_cell(raw["cells"])
    one = min((c for c in raw["cells"] if c.batch == 1), key=lambda c: c.p50_ms)
    section["raw"] = raw
    section["raw_best"], section["raw_batch1"] = best.to_dict(), one.to_dict()
    run.log(f"raw best {best.images_per_s:.0f} images/s ({best.config}, batch {best.batch}); "
            f"fastest batch-1 call {one.p50_ms:.2f} ms p50 ({one.config})")

    tensor, x = tensor_body(harness, run.work_dir, artifact.name)
    png = write_image_body(run.work_dir, f"{artifact.name}-png", noise_png(64, 3, seed=0),
                           "seeded noise 64x64 RGB PNG")
    probs = expected_probabilities(str(artifact.onnx_path), cfg.providers, x)
    tensor_check = Check(tensor.path.read_bytes(),
                         {label: float(p) for label, p in zip(artifact.labels, probs)})
    png_check = Check(png.path.read_bytes(), expected_answer(run, artifact, png, "onnx"))
    log_concs = [c for c in cfg.concs if c in cfg.log_concs] or [max(cfg.concs)]
    ours = [(Row("tensor", "this service", "v2 binary FP32 tensor", "off"), tensor, tensor_check,
             cfg.concs, False),
            (Row("png", "this service", "/v1 PNG upload", "off"), png, png_check, cfg.concs,
             False),
            (Row("tensor-log", "this service", "v2 binary FP32 tensor", "on"), tensor,
             tensor_check, log_concs, True),
            (Row("png-log", "this service", "/v1 PNG upload", "on"), png, png_check, log_concs,
             True)]
    for i in range(cfg.peers_runs):
        run.heading(f"Peers run {i + 1} of {cfg.peers_runs}")
        one_run: dict = {"rows": {}}
        for key in TRITONS:
            if PEERS[key].cuda_only and cfg.providers != "cuda":
                continue
            one_run["rows"][key] = bench_peer(harness, PEERS[key], run, cfg.concs, cfg.port + 1,
                                              f"{key}-{i + 1}", cfg.providers)
        for row, body, check, concs, logged in ours:
            tag = f"{row.key}-{i + 1}"
            spec = ServerSpec(model_tag=f"{artifact.name}:{artifact.version}", runtime="onnx",
                              workers=cfg.workers, providers=cfg.providers, port=cfg.port,
                              log_path=run.work_dir / f"server-{tag}.log", task="image")
            if logged:
                with temp_log() as db:
                    spec = dataclasses.replace(spec, prediction_log=str(db))
                    one_run["rows"][row.key] = bench_served(spec, body, [check], list(concs),
                                                            run.plan(), run.log, tag)
            else:
                one_run["rows"][row.key] = bench_served(spec, body, [check], list(concs),
                                                        run.plan(), run.log, tag)
        one_run["rows"]["fastapi"] = bench_peer(harness, PEERS["fastapi"], run, cfg.concs,
                                                cfg.port + 2, f"fastapi-{i + 1}", cfg.providers)
        section["runs"].append(one_run)
        run.log("\n" + peers_table(section["runs"], one.p50_ms))
    section["table"] = peers_table(section["runs"], one.p50_ms)
    section["verdict"] = verdicts(section["runs"], cfg.concs, one.p50_ms)
    run.heading("Peers: summary")
    run.log(section["table"] + "\n\n" + "\n".join(f"- {v}" for v in section["verdict"]))


ROWS = (Row("triton", "Triton (PyTriton)", "v2 binary FP32 tensor", "-"),
        Row("triton-heuristic", "Triton (PyTriton), cuDNN heuristic", "v2 binary FP32 tensor",
            "-"),
        Row("tensor", "this service", "v2 binary FP32 tensor", "off"),
        Row("tensor-log", "this service", "v2 binary FP32 tensor", "on"),
        Row("png", "this service", "/v1 PNG upload", "off"),
        Row("png-log", "this service", "/v1 PNG upload", "on"),
        Row("fastapi", "FastAPI/uvicorn", "raw float32 bytes", "-"))


def _cell(rows: dict, key: str, conc: int) -> Cell | PeerCell | None:
    return next((c for c in (rows.get(key) or {}).get("cells", []) if c.conc == conc), None)


def _triton(rows: dict, conc: int) -> PeerCell | None:
    """The faster Triton configuration of the run at ``conc`` (one on CPU; on CUDA the better
    of ORT's default cuDNN search and the heuristic one)."""
    cells = [c for c in (_cell(rows, key, conc) for key in TRITONS) if c]
    return max(cells, key=lambda c: c.rps, default=None)


def _span(values: Sequence[float | None], spec: str) -> str:
    got = [v for v in values if v is not None]
    if not got:
        return "-"
    lo, hi = min(got), max(got)
    return fmt(lo, spec) if format(lo, spec) == format(hi, spec) else \
        f"{fmt(lo, spec)}-{fmt(hi, spec)}"


def peers_table(runs: Sequence[dict], batch1_ms: float | None) -> str:
    """One line per server/wire/log and concurrency; every figure min-max over the runs; x
    Triton = req/s over Triton's in the same run."""
    concs = sorted({c.conc for r in runs for row in r["rows"].values()
                    for c in row.get("cells", [])})
    lines = []
    for row in ROWS:
        for conc in concs:
            cells = [_cell(r["rows"], row.key, conc) for r in runs]
            if not any(cells):
                continue
            triton = [_triton(r["rows"], conc) for r in runs]
            x = [ratio(c.rps, t.rps) if c and t else None for c, t in zip(cells, triton)]
            ok = [c for c in cells if c]
            lines.append([row.server, row.wire, row.log, str(conc),
                          _span([c.rps for c in ok], ".0f"), _span(x, ".2f"),
                          _span([c.wrk.p("50") for c in ok], ".1f"),
                          _span([c.wrk.p("99") for c in ok], ".1f"),
                          _span([c.cpu.server_cores for c in ok], ".2f"),
                          _span([c.server_cpu_ms_per_request for c in ok], ".2f"),
                          _span([c.items_per_batch for c in ok], ".1f"),
                          str(sum(c.wrk.errors for c in ok))
                          + (" ⚠" if any(c.contaminated for c in ok) else "")])
    table = markdown_table(["server", "wire", "log", ">c", ">req/s", ">x Triton", ">p50 ms",
                            ">p99 ms", ">srv cores", ">CPU ms/req", ">items/call", ">errors"],
                           lines)
    note = (f"{len(runs)} run(s); a-b = min-max over the runs; x Triton = req/s / Triton's at "
            "the same c in the same run (the faster Triton row where there are two); "
            "items/call = mean items per model call; ⚠ = other "
            "processes took > 0.25 cores during a cell")
    if batch1_ms is not None:
        note += f"; raw batch-1 call {batch1_ms:.2f} ms p50 (the c=1 yardstick)"
    return table + "\n\n" + note + "."


def verdicts(runs: Sequence[dict], concs: Sequence[int], batch1_ms: float | None) -> list[str]:
    """The issue's targets, each as measured (met or by how much it falls short)."""
    out = []
    top = max(concs)

    def per_run(key: str, conc: int, what: Callable[[Any, Any], float | None]) -> list[float]:
        vals = []
        for r in runs:
            c, t = _cell(r["rows"], key, conc), _triton(r["rows"], conc)
            if c and t:
                v = what(c, t)
                if v is not None:
                    vals.append(v)
        return vals

    x = per_run("tensor", top, lambda c, t: ratio(c.rps, t.rps))
    p99 = per_run("tensor", top, lambda c, t: ratio(c.wrk.p("99"), t.wrk.p("99")))
    if x:
        out.append(f"tensor path, c={top}: {_span(x, '.2f')}x Triton's req/s (target >= 1.2: "
                   f"{'met' if min(x) >= 1.2 else 'short'}), p99 {_span(p99, '.2f')}x Triton's "
                   f"(target <= 1: {'met' if max(p99) <= 1.0 else 'short'})")
    for key, what in (("png", "PNG path"), ("tensor-log", "tensor path, log on"),
                      ("png-log", "PNG path, log on")):
        x = per_run(key, top, lambda c, t: ratio(c.rps, t.rps))
        if x:
            out.append(f"{what}, c={top}: {_span(x, '.2f')}x Triton's tensor req/s (target >= 1: "
                       f"{'met' if min(x) >= 1.0 else 'short'})")
    if 1 in concs:
        p50 = per_run("tensor", 1, lambda c, t: c.wrk.p("50"))
        vs_fastapi = []
        for r in runs:
            c, f = _cell(r["rows"], "tensor", 1), _cell(r["rows"], "fastapi", 1)
            if c and f:
                vs_fastapi.append(ratio(c.rps, f.rps))
        vs_fastapi = [v for v in vs_fastapi if v is not None]
        rate = (f"{_span(vs_fastapi, '.2f')}x FastAPI's req/s (target >= 1: "
                f"{'met' if min(vs_fastapi) >= 1.0 else 'short'})" if vs_fastapi else "")
        if p50 and batch1_ms is not None:
            over = [p - batch1_ms for p in p50]
            out.append(f"tensor path, c=1: p50 {_span(p50, '.2f')} ms = raw batch-1 "
                       f"{batch1_ms:.2f} ms + {_span(over, '.2f')} ms (target <= +1 ms: "
                       f"{'met' if max(over) <= 1.0 else 'short'})" + (f"; {rate}" if rate else ""))
        elif rate:
            out.append(f"tensor path, c=1: {rate}")
    return out
