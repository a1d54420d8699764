"""``make bento`` builds offline a Bento holding the production model and serving code only."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_the_bento_holds_the_production_version_and_no_torch(digits_model, bentoml_home):
    from modelstore import registry
    from scripts.build_bento import resolved_bentofile

    name = digits_model.tag.split(":")[0]
    production = registry.resolve(name)
    text = resolved_bentofile((ROOT / "bentofile.yaml").read_text(), [name])
    assert f'  - "{production}"' in text and ":latest" not in text
    env = {**os.environ, "BENTOML_HOME": bentoml_home, "PIP_NO_INDEX": "1"}  # offline
    built = subprocess.run([sys.executable, "scripts/build_bento.py", "--model", name], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    bentos = sorted((Path(bentoml_home) / "bentos" / "clfserve").glob("*/"), key=os.path.getmtime)
    bento = bentos[-1]
    # BentoML 1.4 references the model by tag (containerize and export carry it along)
    assert f"- tag: {production}\n" in (bento / "bento.yaml").read_text()
    for module in ("service/service.py", "modelstore/registry.py", "preprocessing/text.py",
                   "monitoring/store.py"):
        assert (bento / "src" / module).exists(), module
    assert not (bento / "src" / "training").exists()
    requirements = (bento / "env" / "python" / "requirements.txt").read_text().lower()
    assert "onnxruntime" in requirements and "torch" not in requirements
