"""``python -m modelstore list|show|promote|rollback``: the model store's command line.

    list NAME                  versions of a model, newest first, * = production; accuracy,
                               worst robustness variation, attack success rate
    show NAME                  the production pointer as JSON
    promote NAME:VERSION       make a version production (--reason)
    rollback NAME              go back to the previous production (--to VERSION, --reason)

``--store DIR`` (before or after the subcommand) names a BentoML models folder; the default is
``$BENTOML_HOME/models``. Errors print ``error: ...`` on stderr and exit with 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from ._bentoml import open_store
from .registry import (Pointer, RegistryError, list_versions, model_store, promote, read_pointer,
                       resolve, rollback)

if TYPE_CHECKING:
    from ._bentoml import ModelStore


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m modelstore``; returns the exit code (2 with a message on stderr)."""
    args = _parser().parse_args(argv)
    try:
        store = None if args.store is None else _store_at(args.store)
        for line in _COMMANDS[args.command](args, model_store(store)):
            print(line)
    except RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m modelstore",
                                description="List, promote and roll back model versions.")
    store_help = "a BentoML models folder (default: $BENTOML_HOME/models)"
    p.add_argument("--store", metavar="DIR", default=None, help=store_help)
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand's unset --store must not hide one given before the subcommand.
    common.add_argument("--store", metavar="DIR", default=argparse.SUPPRESS, help=store_help)
    for command, target, text in (("list", "NAME", "versions of a model, * = production"),
                                  ("show", "NAME", "the production pointer as JSON"),
                                  ("promote", "NAME:VERSION", "make a version production"),
                                  ("rollback", "NAME", "go back to the previous production")):
        s = sub.add_parser(command, parents=[common], help=text, description=text)
        s.add_argument("target", metavar=target)
        if command in ("promote", "rollback"):
            s.add_argument("--reason", default=command, help="recorded in the pointer and log")
        if command == "rollback":
            s.add_argument("--to", metavar="VERSION", default=None,
                           help="a version to go back to (default: the previous production)")
    return p


def _store_at(folder: str) -> "ModelStore":
    if not Path(folder).is_dir():
        raise RegistryError(f"--store {folder}: no such folder (give a BentoML models folder, "
                            f"e.g. $BENTOML_HOME/models)")
    return open_store(folder)


def _cmd_list(args: argparse.Namespace, store: "ModelStore") -> Iterator[str]:
    """One row per version: test and validation accuracy, the worst variation of the
    robustness suite (name and accuracy) and the attack success rate at the reference strength
    (metrics.json's ``robustness_worst`` and ``attack_success``; "-" where not measured)."""
    yield (f"{'VERSION':<18} {'CREATED':<25} {'TASK':<20} {'TEST_ACC':>8} {'VAL_ACC':>8} "
           f"{'WORST_VARIATION':<20} {'WORST_ACC':>9} {'ATTACK':>6}  PROD")
    for v in list_versions(args.target, store):
        accs = [_fmt(v.metrics.get(k)) for k in ("test_accuracy", "val_accuracy")]
        worst = v.metrics.get("robustness_worst")
        worst = worst if isinstance(worst, dict) else {}
        name = str(worst.get("variation") or "-")
        yield (f"{v.version:<18} {v.created_at:<25} {v.task:<20} {accs[0]:>8} {accs[1]:>8} "
               f"{name:<20} {_fmt(worst.get('accuracy')):>9} "
               f"{_fmt(v.metrics.get('attack_success'), 3):>6}  "
               f"{'*' if v.production else ''}").rstrip()


def _cmd_show(args: argparse.Namespace, store: "ModelStore") -> Iterator[str]:
    pointer = read_pointer(args.target, store)
    if pointer is None:
        raise RegistryError(f"{args.target} has no production pointer; the service serves "
                            f"{resolve(args.target, store)} (the latest) until one is promoted")
    yield json.dumps(asdict(pointer), indent=2)


def _cmd_promote(args: argparse.Namespace, store: "ModelStore") -> Iterator[str]:
    name, _, version = args.target.partition(":")
    if not version:
        raise RegistryError(f"promote needs NAME:VERSION, got {args.target!r}; "
                            f"`python -m modelstore list {name}` shows the versions")
    before = read_pointer(name, store)
    after = promote(name, resolve(args.target, store).partition(":")[2], args.reason, store)
    yield _change(before, after)


def _cmd_rollback(args: argparse.Namespace, store: "ModelStore") -> Iterator[str]:
    before = read_pointer(args.target, store)
    yield _change(before, rollback(args.target, args.to, args.reason, store))


_COMMANDS = {"list": _cmd_list, "show": _cmd_show, "promote": _cmd_promote,
             "rollback": _cmd_rollback}


def _change(before: Pointer | None, after: Pointer) -> str:
    if after == before:
        return f"{after.name}:{after.version} is already production; nothing changed"
    was = "no pointer" if before is None else f"{before.name}:{before.version}"
    return f"{after.name}:{after.version} is production now (was {was}; {after.reason})"


def _fmt(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"

