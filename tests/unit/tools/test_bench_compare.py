"""``python -m tools.bench.compare``: the trees' order round by round and the per-round
ratios it prints beside the medians."""

from __future__ import annotations

import pytest

from tools.bench.compare import batching_verdicts, cell_stem, main, round_order, round_ratios
from tools.bench.predlog import remove_log


def test_neither_tree_always_goes_first():
    trees = ["before", "after"]
    assert [round_order(trees, r) for r in range(4)] == [
        ["before", "after"], ["after", "before"], ["before", "after"], ["after", "before"]]
    assert trees == ["before", "after"]  # not reversed in place


def test_per_round_ratios_pair_the_cells_of_each_round():
    before = [(800.0, 2.0), (900.0, 2.1), (0.0, 9.9)]
    after = [(880.0, 1.9), (855.0, 2.0), (700.0, 2.2)]
    assert round_ratios(before, after) == pytest.approx([1.1, 0.95])  # a dead cell: left out


def test_the_tensor_wire_is_offered_and_a_wrong_one_refused(capsys):
    with pytest.raises(SystemExit):
        main(["--rev", "HEAD", "--wire", "v3"])
    assert "v2-tensor" in capsys.readouterr().err


def test_each_cell_says_how_many_workers_found_batching_paying():
    head = "[INFO] [entry_service:clfserve:{}] peers-resnet: a one-item call 1.19 ms, per item in a "
    log = "\n".join([
        "[INFO] settings: {...}",
        head.format(1) + "batch 0.95 ms: batching pays",
        head.format(2) + "batch 0.96 ms: batching does not pay (a lone request on an idle model "
                         "runs inline)"])
    assert batching_verdicts(log) == "1/2"
    assert batching_verdicts(log.replace(": batching pays", ": batching does not pay")) == "0/2"
    assert batching_verdicts("[INFO] settings: {...}") == "?"


def test_every_server_start_gets_its_own_log_and_database(tmp_path):
    stems = {cell_stem(rnd, label, log_on)
             for rnd in range(3) for label in ("before (HEAD~1)", "after (working tree)")
             for log_on in (False, True)}
    assert len(stems) == 12  # later rounds no longer share (and append to) one database
    assert cell_stem(2, "after (working tree)", True) == "r3-after-logon"

    for name in ("r1-before-logon.db", "r1-before-logon.db-writers", "r1-after-logon.db"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "r1-before-logon.db.journal").mkdir()
    (tmp_path / "r1-before-logon.db.journal" / "0001").write_bytes(b"x")
    (tmp_path / "r1-before-logon.log").write_text("kept")
    remove_log(tmp_path / "r1-before-logon.db")  # what compare removes when a server stops
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r1-after-logon.db",
                                                          "r1-before-logon.log"]
