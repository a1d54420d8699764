"""Build the Bento with the PRODUCTION version of each model: ``make bento``.

``bentofile.yaml`` names models by tag, and a tag has no notion of "production", so this resolves
each model name through the production pointer (``modelstore/registry.py``) and builds from a copy
of ``bentofile.yaml`` with those exact versions. Offline: no lock against a remote index.

    python scripts/build_bento.py [--model digits-cnn] [--model lang-transformer] [--bentofile bentofile.yaml]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def resolved_bentofile(text: str, models: list[str]) -> str:
    """``bentofile.yaml`` with its ``models:`` list replaced by the production tags."""
    from modelstore import registry

    tags = [registry.resolve(name) for name in models]
    lines, out, skipping = text.splitlines(), [], False
    for line in lines:
        if line.startswith("models:"):
            out.append("models:")
            out.extend(f'  - "{tag}"' for tag in tags)
            skipping = True
            continue
        if skipping and (line.startswith("  ") or not line.strip()):
            continue
        skipping = False
        out.append(line)
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", help="model name (repeatable; default digits-cnn)")
    p.add_argument("--bentofile", default=str(ROOT / "bentofile.yaml"))
    args = p.parse_args(argv)
    from modelstore.registry import RegistryError

    try:
        text = resolved_bentofile(Path(args.bentofile).read_text(), args.model or ["digits-cnn"])
    except RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(text, end="")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", dir=ROOT, prefix=".bentofile-",
                                     delete=False) as handle:
        handle.write(text)
    try:
        bentoml = str(Path(sys.executable).parent / "bentoml")
        env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true"}
        return subprocess.run([bentoml, "build", "-f", handle.name, str(ROOT)], env=env,
                              cwd=ROOT).returncode
    finally:
        os.unlink(handle.name)


if __name__ == "__main__":
    sys.exit(main())
