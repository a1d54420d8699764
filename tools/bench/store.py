"""The models the bench serves, from BentoML's model store (``$BENTOML_HOME``).

The reference model is exported if the store lacks it (by ``training.reference_model`` in a child
process, so torch never loads into the bench), and so is the text model (``training.text``, the
from-scratch transformer on the demo data, ~1 min); the trained default model is only looked up.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Callable

from modelstore import store_dir
from modelstore.artifact import Artifact, ArtifactError, load_artifact

from .config import REPO_ROOT


def store_path() -> str:
    """The model store's folder ($BENTOML_HOME/models)."""
    return store_dir()


def has_model(tag: str) -> bool:
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        bentoml.models.get(tag)
    except (NotFound, ValueError):
        return False
    return True


def ensure_reference(name: str, log: Callable[[str], None]) -> tuple[Artifact, bool]:
    """The reference model's artifact, exported first if absent; returns (artifact, exported)."""
    tag = f"{name}:latest"
    exported = False
    if not has_model(tag):
        log(f"  [store] {tag} not in {store_path()}: exporting it "
            "(python -m training.reference_model)")
        proc = subprocess.run([sys.executable, "-m", "training.reference_model", "--name", name],
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise ArtifactError(f"exporting the reference model failed (rc={proc.returncode}):\n"
                                + (proc.stdout + proc.stderr)[-3000:])
        exported = True
    return load_artifact(tag), exported


def ensure_text_model(name: str, work_dir: Path, log: Callable[[str], None]
                      ) -> tuple[Artifact, bool]:
    """The bench's text model (``python -m training.text --model transformer``, seeded demo
    data), trained and exported first if absent; returns (artifact, trained now). Its curves
    and metrics go to the run's work folder, not the repository's artifacts/."""
    tag = f"{name}:latest"
    trained = False
    if not has_model(tag):
        cmd = [sys.executable, "-m", "training.text", "--model", "transformer", "--model-name",
               name, "--out-dir", str(work_dir / f"train-{name}"), "--no-progress"]
        log(f"  [store] {tag} not in {store_path()}: training it ({' '.join(cmd[1:])})")
        proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1200)
        if proc.returncode != 0:
            raise ArtifactError(f"training the text model failed (rc={proc.returncode}):\n"
                                + (proc.stdout + proc.stderr)[-3000:])
        log("\n".join("  [train] " + line for line in proc.stdout.strip().splitlines()[-4:]))
        trained = True
    return load_artifact(tag, "text"), trained


def find_default(tag: str) -> Artifact | None:
    """The trained default model's artifact, or None when the store does not have it."""
    if not tag or not has_model(tag):
        return None
    return load_artifact(tag)
