"""Run one of the peers' servers with its ONNX Runtime session on the CUDA provider.

The harness's servers (``../shared/peers-bench/servers``) build their session through
``common.make_session``, which asks for the CPU provider only. For the peers table on a GPU this
launcher runs in the peer's own environment (its venv's python: stdlib, numpy and onnxruntime,
nothing of this repository), makes every ``onnxruntime.InferenceSession`` of the process put the
CUDA provider first while keeping the harness's session options, and runs the server script as
``__main__``. A session that does not get the CUDA provider stops the server: no silent CPU
fallback in a table that says CUDA.

    PEERS_ORT_PROVIDER=cuda PEERS_CUDNN_CONV_ALGO_SEARCH=HEURISTIC \\
        venv-triton/bin/python tools/bench/peer_provider.py servers/pytriton_server.py --port 8103

``PEERS_CUDNN_CONV_ALGO_SEARCH`` (EXHAUSTIVE, ORT's default; HEURISTIC; DEFAULT) is the CUDA
provider's ``cudnn_conv_algo_search``: with EXHAUSTIVE, ORT benchmarks the convolutions again
whenever a call's batch size differs from the call before, which a dynamic batcher's calls do
all the time (this service pads to fixed batch shapes instead, ``OnnxModel.fix_batch_shapes``).
"""

from __future__ import annotations

import os
import runpy
import sys

PROVIDER_ENV = "PEERS_ORT_PROVIDER"
ALGO_ENV = "PEERS_CUDNN_CONV_ALGO_SEARCH"
ALGOS = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")


def providers_from_env(environ=os.environ) -> list:
    """The provider list every session of the process gets (CPU last, for the ops CUDA lacks)."""
    provider = environ.get(PROVIDER_ENV, "cuda").lower()
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    if provider != "cuda":
        raise SystemExit(f"{PROVIDER_ENV}={provider!r}: expected cuda or cpu")
    algo = environ.get(ALGO_ENV, "EXHAUSTIVE").upper()
    if algo not in ALGOS:
        raise SystemExit(f"{ALGO_ENV}={algo!r}: expected one of {', '.join(ALGOS)}")
    return [("CUDAExecutionProvider", {"cudnn_conv_algo_search": algo}), "CPUExecutionProvider"]


def patch_sessions(ort, use: list) -> None:
    """Every ``ort.InferenceSession(...)`` from now on is built with ``use`` and fails if
    the first of them is not the one it runs on."""
    base = ort.InferenceSession
    wanted = use[0][0] if isinstance(use[0], tuple) else use[0]

    class Session(base):  # type: ignore[misc, valid-type]
        def __init__(self, path_or_bytes, sess_options=None, providers=None,
                     provider_options=None, **kwargs):
            super().__init__(path_or_bytes, sess_options=sess_options, providers=use,
                             **kwargs)
            got = self.get_providers()
            if not got or got[0] != wanted:
                raise SystemExit(f"asked ONNX Runtime for {wanted}, got {got} (available: "
                                 f"{ort.get_available_providers()})")
            options = self.get_provider_options().get(wanted, {})
            print(f"[peer_provider] session on {got[0]} {_algo(options)}".rstrip(), flush=True)

    ort.InferenceSession = Session


def _algo(options: dict) -> str:
    algo = options.get("cudnn_conv_algo_search")
    return f"(cudnn_conv_algo_search={algo})" if algo else ""


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit("usage: peer_provider.py SERVER_SCRIPT [ARGS...]")
    script = os.path.abspath(argv[0])
    import onnxruntime as ort

    patch_sessions(ort, providers_from_env())
    sys.argv = [script, *argv[1:]]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
