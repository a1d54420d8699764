"""The model store: the artifact's file layout, writing a version, the production pointer
(resolve rules, promote/rollback, refusals), the CLI, crash atomicity and concurrent writers.
Fake versions (three small files each), no training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from modelstore import ModelStore, cli as commands, open_store, registry
from modelstore.registry import RegistryError

ROOT = Path(__file__).resolve().parents[2]
NAME = "digits"


def make_version(store: ModelStore, name: str = NAME, *, files=registry.REQUIRED_FILES,
                 metrics: dict | None = None, task: str = "image-classification") -> str:
    """A new version holding ``files`` (placeholder contents); returns its version."""
    import bentoml

    with bentoml.models.create(name, labels={"task": task}, _model_store=store) as model:
        for f in files:
            Path(model.path, f).write_text("[]")
        if metrics is not None:
            Path(model.path, "metrics.json").write_text(json.dumps(metrics))
    time.sleep(0.002)  # distinct creation times: "latest" and "newest first" are by time
    return str(model.tag.version)


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return open_store(tmp_path / "models")


@pytest.fixture
def versions(store: ModelStore) -> list[str]:
    return [make_version(store) for _ in range(3)]


def audit(store: ModelStore, name: str = NAME) -> list[dict]:
    path = Path(store._path) / name / registry.LOG_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_required_files_match_the_service() -> None:
    from modelstore.artifact import REQUIRED_FILES

    assert registry.REQUIRED_FILES == REQUIRED_FILES


def test_layout_names_each_file_once() -> None:
    from modelstore import layout

    assert layout.REQUIRED_FILES == ("model.onnx", "spec.json", "labels.json")
    assert layout.IMAGE_FILES[:3] == layout.REQUIRED_FILES
    assert layout.TEXT_FILES == (*layout.IMAGE_FILES, layout.TOKENIZER_FILE)
    assert len(set(layout.TEXT_FILES)) == len(layout.TEXT_FILES) == 9


def test_import_loads_no_bentoml() -> None:
    code = ("import sys, modelstore, modelstore.layout, modelstore.registry, modelstore.store, "
            "modelstore.cli\nprint('bentoml' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_version_path(store, versions) -> None:
    v1, _, v3 = versions
    assert registry.version_path(f"{NAME}:{v1}", store) == Path(store._path) / NAME / v1
    assert registry.version_path(NAME, store) == Path(store._path) / NAME / v3
    with pytest.raises(RegistryError, match="not in the model store"):
        registry.version_path(f"{NAME}:nosuchversion", store)


def test_load_artifact_names_the_store_and_bentoml_home() -> None:
    from modelstore.artifact import ArtifactError, load_artifact

    with pytest.raises(ArtifactError, match="BENTOML_HOME") as info:
        load_artifact("no-such-model-anywhere", "text")
    assert "CLF_TEXT_MODEL" in str(info.value) and "not in the BentoML model store" in str(info.value)
    with pytest.raises(ArtifactError, match="MY_SETTING"):
        load_artifact("no-such-model-anywhere", "image", setting="MY_SETTING")


def test_resolve_without_pointer_falls_back_to_latest(store, versions) -> None:
    v1, _, v3 = versions
    assert registry.read_pointer(NAME, store) is None
    assert registry.production(NAME, store) is None
    assert registry.resolve(NAME, store) == f"{NAME}:{v3}"
    assert registry.resolve(f"{NAME}:production", store) == f"{NAME}:{v3}"
    assert registry.resolve(f"{NAME}:latest", store) == f"{NAME}:{v3}"
    assert registry.resolve(f"{NAME}:{v1}", store) == f"{NAME}:{v1}"


def test_resolve_follows_the_pointer(store, versions) -> None:
    v1, _, v3 = versions
    registry.promote(NAME, v1, store=store)
    assert registry.resolve(NAME, store) == f"{NAME}:{v1}"
    assert registry.resolve(f"{NAME}:production", store) == f"{NAME}:{v1}"
    assert registry.resolve(f"{NAME}:latest", store) == f"{NAME}:{v3}"


def test_resolve_refuses_unknowns(store, versions) -> None:
    with pytest.raises(RegistryError, match="no model named 'other'"):
        registry.resolve("other", store)
    with pytest.raises(RegistryError, match="not in the model store"):
        registry.resolve(f"{NAME}:nosuchversion", store)
    with pytest.raises(RegistryError, match="not a valid model name"):
        registry.resolve("Bad Name!", store)


def test_resolve_refuses_a_dangling_pointer(store, versions) -> None:
    registry.promote(NAME, versions[0], store=store)
    store.delete(f"{NAME}:{versions[0]}")
    with pytest.raises(RegistryError, match="no longer in the model store"):
        registry.resolve(NAME, store)


def test_promote_and_rollback_keep_a_history(store, versions) -> None:
    v1, v2, v3 = versions
    first = registry.promote(NAME, v1, store=store)
    assert (first.version, first.history, first.reason) == (v1, (), "promote")
    registry.promote(NAME, v2, store=store)
    p = registry.promote(NAME, v3, reason="better val_accuracy", store=store)
    assert (p.version, p.history, p.reason) == (v3, (v2, v1), "better val_accuracy")
    assert registry.read_pointer(NAME, store) == p
    assert json.loads(registry.pointer_path(NAME, store).read_text())["history"] == [v2, v1]

    back = registry.rollback(NAME, store=store)
    assert (back.version, back.history, back.reason) == (v2, (v1,), "rollback")
    back = registry.rollback(NAME, store=store)
    assert (back.version, back.history) == (v1, ())
    with pytest.raises(RegistryError, match="nothing|no earlier production"):
        registry.rollback(NAME, store=store)

    # Re-promoting a version that is in the history does not duplicate it.
    registry.promote(NAME, v2, store=store)
    registry.promote(NAME, v3, store=store)
    assert registry.promote(NAME, v1, store=store).history == (v3, v2)
    log = audit(store)
    assert [(e["from"], e["to"]) for e in log] == [
        (None, v1), (v1, v2), (v2, v3), (v3, v2), (v2, v1), (v1, v2), (v2, v3), (v3, v1)]
    assert all(e["time"] and e["user"] and e["reason"] for e in log)


def test_rollback_to_a_named_version(store, versions) -> None:
    v1, v2, v3 = versions
    for v in versions:
        registry.promote(NAME, v, store=store)
    p = registry.rollback(NAME, to=v1, reason="v2 and v3 misbehave", store=store)
    assert (p.version, p.history, p.reason) == (v1, (), "v2 and v3 misbehave")
    # A version that was never production is allowed too; the history stays as it was.
    registry.promote(NAME, v2, store=store)
    assert registry.rollback(NAME, to=v3, store=store).history == (v1,)
    with pytest.raises(RegistryError, match="not in the model store"):
        registry.rollback(NAME, to="nosuchversion", store=store)


def test_rollback_without_pointer(store, versions) -> None:
    with pytest.raises(RegistryError, match="no production pointer"):
        registry.rollback(NAME, store=store)


def test_promote_of_the_production_version_is_a_noop(store, versions, caplog) -> None:
    p = registry.promote(NAME, versions[0], store=store)
    caplog.set_level("INFO", logger="modelstore.registry")
    assert registry.promote(NAME, versions[0], reason="again", store=store) == p
    assert "already production" in caplog.text
    assert len(audit(store)) == 1


def test_promote_refuses_missing_or_incomplete_versions(store, versions) -> None:
    registry.promote(NAME, versions[0], store=store)
    before = registry.pointer_path(NAME, store).read_bytes()
    incomplete = make_version(store, files=("model.onnx", "spec.json"))
    with pytest.raises(RegistryError, match="lacks labels.json"):
        registry.promote(NAME, incomplete, store=store)
    with pytest.raises(RegistryError, match="not in the model store"):
        registry.promote(NAME, "nosuchversion", store=store)
    with pytest.raises(RegistryError, match="no model named"):
        registry.promote("other", versions[0], store=store)
    assert registry.pointer_path(NAME, store).read_bytes() == before
    assert len(audit(store)) == 1


@pytest.mark.parametrize("content", ["", "{not json", '{"name": "digits"}', "[]",
                                     '{"name": "digits", "version": 3, "history": [], '
                                     '"updated_at": "x", "reason": "y"}',
                                     '{"name": "digits", "version": "a", "history": "bc", '
                                     '"updated_at": "x", "reason": "y"}'])
def test_a_corrupt_pointer_is_an_error_naming_the_file(store, versions, content) -> None:
    path = registry.pointer_path(NAME, store)
    path.write_text(content)
    for call in (lambda: registry.read_pointer(NAME, store), lambda: registry.resolve(NAME, store),
                 lambda: registry.promote(NAME, versions[0], store=store)):
        with pytest.raises(RegistryError, match="corrupt") as info:
            call()
        assert str(path) in str(info.value)


def test_ensure_production_only_sets_the_first(store, versions) -> None:
    p = registry.ensure_production(NAME, versions[0], store=store)
    assert (p.version, p.reason) == (versions[0], "first export")
    assert registry.ensure_production(NAME, versions[1], store=store) is None
    assert registry.production(NAME, store) == versions[0]


def test_save_version_makes_the_first_export_production(store, tmp_path) -> None:
    from modelstore.store import save_version

    staged = tmp_path / "staged"
    staged.mkdir()
    for f in registry.REQUIRED_FILES:
        (staged / f).write_text("[]")
    tags = [save_version(staged, "fresh", files=registry.REQUIRED_FILES,
                         task="text-classification", metadata={}, store=store) for _ in range(2)]
    assert registry.production("fresh", store) == tags[0].version


def test_list_versions(store) -> None:
    v1 = make_version(store, metrics={"test_accuracy": 0.9, "val_accuracy": 0.85})
    v2 = make_version(store, task="text-classification")
    registry.promote(NAME, v1, store=store)
    infos = registry.list_versions(NAME, store)
    assert [i.version for i in infos] == [v2, v1]
    assert [i.production for i in infos] == [False, True]
    assert infos[1].metrics == {"test_accuracy": 0.9, "val_accuracy": 0.85}
    assert infos[0].metrics == {} and infos[0].task == "text-classification"
    assert infos[1].path == Path(store._path) / NAME / v1
    with pytest.raises(RegistryError, match="no model named"):
        registry.list_versions("other", store)


# ---- the command line --------------------------------------------------------------------

def cli(store: ModelStore, *args: str) -> int:
    return commands.main([*args, "--store", str(store._path)])


def test_cli(store, capsys) -> None:
    v1 = make_version(store, metrics={"test_accuracy": 0.91234, "val_accuracy": 0.8})
    v2 = make_version(store)
    assert cli(store, "show", NAME) == 2
    assert "no production pointer" in capsys.readouterr().err

    assert cli(store, "promote", f"{NAME}:{v1}", "--reason", "first") == 0
    assert f"{NAME}:{v1} is production now (was no pointer; first)" in capsys.readouterr().out
    assert cli(store, "promote", f"{NAME}:{v1}") == 0
    assert "already production" in capsys.readouterr().out
    assert cli(store, "promote", f"{NAME}:latest") == 0
    assert f"{NAME}:{v2} is production now" in capsys.readouterr().out

    assert cli(store, "list", NAME) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split() == ["VERSION", "CREATED", "TASK", "TEST_ACC", "VAL_ACC",
                              "WORST_VARIATION", "WORST_ACC", "ATTACK", "PROD"]
    assert rows[0].startswith(v2) and rows[0].endswith("*")
    assert rows[1].split()[0] == v1 and "0.9123" in rows[1] and not rows[1].endswith("*")

    assert cli(store, "show", NAME) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["version"], shown["history"]) == (v2, [v1])

    assert cli(store, "rollback", NAME, "--reason", "bad canary") == 0
    assert f"{NAME}:{v1} is production now (was {NAME}:{v2}; bad canary)" in capsys.readouterr().out
    assert cli(store, "rollback", NAME) == 2
    assert "no earlier production version" in capsys.readouterr().err
    assert cli(store, "rollback", NAME, "--to", v2) == 0
    capsys.readouterr()


def test_cli_errors(store, tmp_path, capsys) -> None:
    v1 = make_version(store)
    for args in (["promote", NAME], ["promote", f"{NAME}:nope"], ["list", "other"]):
        assert cli(store, *args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err
    assert commands.main(["list", NAME, "--store", str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err
    # --store before the subcommand works too
    assert commands.main(["--store", str(store._path), "promote", f"{NAME}:{v1}"]) == 0
    with pytest.raises(SystemExit) as info:
        commands.main(["frobnicate"])
    assert info.value.code == 2


def run_module(store: ModelStore, *args: str, env: dict | None = None
               ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "modelstore", *args, "--store",
                           str(store._path)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=60)


def test_python_dash_m(store) -> None:
    v1 = make_version(store)
    done = run_module(store, "promote", f"{NAME}:{v1}")
    assert done.returncode == 0, done.stderr
    assert registry.production(NAME, store) == v1
    done = run_module(store, "rollback", NAME)
    assert done.returncode == 2 and done.stderr.startswith("error: ")


# ---- atomicity and concurrency -----------------------------------------------------------

@pytest.mark.parametrize("step", ["after_temp_write", "before_replace", "after_replace"])
def test_a_crash_leaves_the_old_or_the_new_pointer(store, versions, step) -> None:
    v1, v2, _ = versions
    old = registry.promote(NAME, v1, store=store)
    done = run_module(store, "promote", f"{NAME}:{v2}", env={registry.CRASH_ENV: step})
    assert done.returncode == -9, done.stderr  # SIGKILLed where asked
    pointer = registry.read_pointer(NAME, store)  # parses, or this raises
    folder = registry.pointer_path(NAME, store).parent
    if step == "after_replace":
        assert (pointer.version, pointer.history) == (v2, (v1,))
        assert len(audit(store)) == 1  # the log may lag the pointer; the pointer is the truth
    else:
        assert pointer == old
        assert list(folder.glob(".production.*.tmp"))  # the crashed writer's leftover
    # The next writer cleans up and works.
    registry.promote(NAME, versions[2], store=store)
    assert not list(folder.glob(".production.*.tmp"))
    assert registry.production(NAME, store) == versions[2]


def test_concurrent_writers_leave_a_valid_pointer(store, versions, tmp_path) -> None:
    v1, v2, _ = versions
    go = tmp_path / "go"
    script = textwrap.dedent(f"""
        import pathlib, sys, time
        from modelstore import open_store, registry
        store = open_store({str(store._path)!r})
        order = sys.argv[1:]
        while not pathlib.Path({str(go)!r}).exists():  # start together, after the imports
            time.sleep(0.005)
        for i in range(20):
            registry.promote({NAME!r}, order[i % 2], reason=f"round {{i}}", store=store)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, *order], cwd=ROOT,
                              stderr=subprocess.PIPE, text=True)
             for order in ([v1, v2], [v2, v1])]
    time.sleep(0.5)
    go.touch()
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    pointer = registry.read_pointer(NAME, store)
    assert pointer.version in (v1, v2)
    assert set(pointer.history) == {v1, v2} - {pointer.version}
    log = audit(store)  # every line whole: appends happen under the lock
    assert 1 <= len(log) <= 40 and log[-1]["to"] == pointer.version
    assert all(a["to"] == b["from"] for a, b in zip(log, log[1:]))
    assert not list(registry.pointer_path(NAME, store).parent.glob(".production.*.tmp"))


def test_promote_with_expect_is_a_compare_and_swap(store, versions) -> None:
    a, b, c = versions[:3]
    registry.promote(NAME, a, store=store)
    registry.promote(NAME, b, store=store, expect=a)
    assert registry.production(NAME, store) == b
    with pytest.raises(RegistryError, match=f"production is {b}, not {a}"):
        registry.promote(NAME, c, store=store, expect=a)
    assert registry.production(NAME, store) == b
