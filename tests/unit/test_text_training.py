"""Unit tests for training/text: demo data, reading CSV/TSV/JSONL, splits, the BPE tokenizer,
model shapes and padding invariance, class weights, length-grouped batches, the config."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from preprocessing import TextPreprocessor, TextSpec
from training.loop import fit, make_loader
from training.text.config import TextTrainConfig, config_from_args
from training.text.data import (DataError, LabelledTexts, LengthGroupedBatches, TextDataset,
                                balanced_class_weights, check_texts, data_hash, read_texts,
                                stratified_split)
from training.text.demo import LOCALES, demo_texts
from training.text.models import (TransformerConfig, build_minilm, build_transformer,
                                  masked_mean)
from training.text.tokenizer import SPECIAL_TOKENS, minilm_path, train_bpe_tokenizer


@pytest.fixture(scope="module")
def demo() -> LabelledTexts:
    return demo_texts(per_class=30, seed=0)


@pytest.fixture(scope="module")
def pre(demo: LabelledTexts) -> TextPreprocessor:
    return TextPreprocessor(TextSpec(max_length=48), train_bpe_tokenizer(
        [t.lower() for t in demo.texts], vocab_size=600))


# --- demo data ---------------------------------------------------------------------------------

def test_demo_data_is_deterministic_unique_and_varied(demo: LabelledTexts) -> None:
    again = demo_texts(per_class=30, seed=0)
    assert again == demo
    assert demo_texts(per_class=30, seed=1).texts != demo.texts
    assert demo.classes == tuple(sorted(LOCALES)) and len(demo) == 30 * len(LOCALES)
    assert np.bincount(demo.labels).tolist() == [30] * len(LOCALES)
    assert len(set(demo.texts)) == len(demo)  # unique: no text in two splits
    words = [len(t.split()) for t in demo.texts]
    assert min(words) <= 2 and max(words) >= 25  # snippets and paragraphs
    assert any("\u0400" <= ch <= "\u04ff" for ch in demo.texts[demo.labels.index(
        demo.classes.index("ru"))])


def test_demo_data_is_the_same_in_another_process(demo: LabelledTexts) -> None:
    """Nothing in the generator may depend on the process's hash seed (set iteration order)."""
    import subprocess
    import sys

    code = ("from training.text.demo import demo_texts; from training.text.data import data_hash;"
            " print(data_hash(demo_texts(per_class=30, seed=0)))")
    for hash_seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parents[2], timeout=60,
                             env={**os.environ, "PYTHONHASHSEED": hash_seed})
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == data_hash(demo)


def test_demo_data_does_not_depend_on_the_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Faker's date() draws up to *now* unless told an end; the demo's dates must not move
    with the clock (they did: the text model's run-to-run spread with one seed)."""
    import datetime as dt
    import re

    import faker.providers.date_time as faker_dates

    today = demo_texts(per_class=60, seed=0)
    assert sum(bool(re.search(r"\d{4}-\d\d-\d\d", t)) for t in today.texts) >= 5

    class Later(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return dt.datetime(2091, 6, 1, tzinfo=tz)

    monkeypatch.setattr(faker_dates, "datetime", Later)
    assert data_hash(demo_texts(per_class=60, seed=0)) == data_hash(today)


# --- reading files -----------------------------------------------------------------------------

ROWS = [("Bonjour, le monde", "fr"), ('say "hi",\nthen go', "en"), ("Hallo Welt", "de"),
        ("emoji 😀 ok", "en")]


def write_table(path: Path, text_col: str = "sentence", label_col: str = "lang") -> Path:
    import csv

    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({text_col: t, label_col: lab, "id": i}) + "\n"
                                for i, (t, lab) in enumerate(ROWS)), encoding="utf-8")
        return path
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t" if path.suffix == ".tsv" else ",")
        writer.writerow(["id", text_col, label_col])
        writer.writerows([i, t, lab] for i, (t, lab) in enumerate(ROWS))
    return path


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_read_texts_with_configured_columns(tmp_path: Path, suffix: str) -> None:
    data = read_texts(write_table(tmp_path / f"d{suffix}"), "sentence", "lang")
    assert data.texts == tuple(t for t, _ in ROWS)
    assert data.classes == ("de", "en", "fr")
    assert [data.classes[i] for i in data.labels] == [lab for _, lab in ROWS]
    assert all(name.startswith(f"d{suffix}:") for name in data.names)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_missing_column_is_named_with_the_columns_there_are(tmp_path: Path,
                                                              suffix: str) -> None:
    path = write_table(tmp_path / f"d{suffix}")
    with pytest.raises(DataError, match=r"no column \['text'\].*sentence.*--text-column"):
        read_texts(path, "text", "lang")


@pytest.mark.parametrize("name, content, words", [
    ("empty.csv", "", "empty"),
    ("blank.jsonl", "\n  \n", "empty"),
    ("header.csv", "text,label\n", "no rows"),
    ("bad.jsonl", '{"text": "a", "label": "x"}\n{oops\n', r"bad.jsonl:2: not valid JSON"),
    ("list.jsonl", '["a", "x"]\n', "JSON object"),
    ("notext.csv", "text,label\nhello,a\n,b\n", r"notext.csv:3: the text is empty"),
    ("nolabel.jsonl", '{"text": "a", "label": null}\n', "label is empty"),
    ("extra.csv", "text,label\na,b,c\n", "more fields"),
    ("data.txt", "text,label\n", r"\.csv, \.tsv or \.jsonl"),
])
def test_bad_files_give_clear_errors(tmp_path: Path, name: str, content: str,
                                     words: str) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=words):
        read_texts(path)


def test_a_non_utf8_file_and_a_missing_file_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\ncafé,fr\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        read_texts(path)
    with pytest.raises(DataError, match="does not exist"):
        read_texts(tmp_path / "missing.csv")


def test_a_bom_is_ignored_and_numeric_labels_become_strings(tmp_path: Path) -> None:
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufefftext,label\nyes,1\nno,0\n".encode())
    data = read_texts(path)
    assert data.classes == ("0", "1") and data.texts == ("yes", "no")


def test_check_texts_names_the_row_the_service_would_refuse() -> None:
    data = LabelledTexts.from_names(["fine", "nul\x00here"], ["a", "b"], ["f:2", "f:3"], "f")
    with pytest.raises(DataError, match="f:3: .*NUL"):
        check_texts(data, TextSpec())


def test_split_is_deterministic_stratified_and_disjoint(demo: LabelledTexts) -> None:
    a, b = stratified_split(demo, seed=0), stratified_split(demo, seed=0)
    assert a == b
    parts = [set(p.texts) for p in (a.train, a.val, a.test)]
    assert sum(map(len, parts)) == len(demo) and not (parts[0] & parts[1] or parts[1] & parts[2])
    assert len(set(a.test.labels)) == len(demo.classes)
    tiny = LabelledTexts.from_names(["a", "b", "c", "d"], ["x", "x", "x", "y"], list("1234"), "t")
    with pytest.raises(DataError, match="at least 3 texts"):
        stratified_split(tiny, seed=0)


def test_data_hash_ignores_order(demo: LabelledTexts) -> None:
    assert data_hash(demo) == data_hash(demo.subset(range(len(demo) - 1, -1, -1)))
    assert data_hash(demo) != data_hash(demo.subset(range(len(demo) - 1)))


# --- tokenizer ---------------------------------------------------------------------------------

def test_bpe_tokenizer_is_deterministic_and_has_bert_specials(demo: LabelledTexts) -> None:
    texts = [t.lower() for t in demo.texts]
    first = train_bpe_tokenizer(texts, vocab_size=800)
    assert all(train_bpe_tokenizer(texts, vocab_size=800) == first for _ in range(3))
    pre = TextPreprocessor(TextSpec(), first)
    assert [pre._tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    ids, _ = pre.encode(["Hallo Welt"])
    assert ids[0, 0] == 2 and ids[0, -1] == 3  # [CLS] ... [SEP]
    assert pre.vocab_size <= 800


# --- models ------------------------------------------------------------------------------------

def test_transformer_shapes_and_padding_does_not_change_a_text(pre: TextPreprocessor) -> None:
    torch.manual_seed(0)
    model = build_transformer(TransformerConfig(vocab_size=pre.vocab_size, num_classes=5,
                                                max_length=48, d_model=32, heads=4,
                                                layers=2, ff_dim=64)).eval()
    texts = ["kurz", "a much longer text with many more words than the first one"]
    ids, mask = (torch.from_numpy(a) for a in pre.encode(texts))
    with torch.no_grad():
        logits, embedding = model(ids, mask)
        alone = model(*(torch.from_numpy(a) for a in pre.encode(texts[:1])))
    assert logits.shape == (2, 5) and embedding.shape == (2, 32)
    assert ids.shape[1] > alone[0].shape[0]
    torch.testing.assert_close(alone[0][0], logits[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(alone[1][0], embedding[0], atol=1e-5, rtol=0)


def test_masked_mean_ignores_padding() -> None:
    hidden = torch.tensor([[[1.0], [3.0], [100.0]]])
    assert masked_mean(hidden, torch.tensor([[1, 1, 0]])).item() == 2.0


def test_minilm_shapes_and_freezing() -> None:
    torch.manual_seed(0)
    model = build_minilm(minilm_path(), num_classes=3, freeze=True)
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    model.train()
    assert not model.encoder.training and model.head.training  # no dropout in frozen features
    ids = torch.tensor([[101, 7592, 2088, 102], [101, 7592, 102, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        logits, embedding = model.eval()(ids, mask)
    assert logits.shape == (2, 3) and embedding.shape == (2, 384)


def test_transformer_overfits_one_batch_through_the_dataset(demo: LabelledTexts,
                                                            pre: TextPreprocessor) -> None:
    """Model + optimiser + the dataset's collate: 32 texts are memorised."""
    torch.manual_seed(0)
    batch = demo.subset(range(0, len(demo), len(demo) // 32)[:32])
    (ids, mask), y = TextDataset(batch, pre).collate(list(zip(batch.texts, batch.labels)))
    model = build_transformer(TransformerConfig(vocab_size=pre.vocab_size, num_classes=11,
                                                max_length=48, d_model=32, layers=1,
                                                heads=2, ff_dim=64, dropout=0.0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(80):
        loss = F.cross_entropy(model(ids, mask)[0], y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05


# --- class weights, batches, loop --------------------------------------------------------------

def test_balanced_class_weights() -> None:
    weights = balanced_class_weights([0, 0, 0, 1], 2)
    assert weights.tolist() == pytest.approx([4 / 6, 2.0])
    with pytest.raises(DataError, match="no training texts"):
        balanced_class_weights([0, 0], 2)


def test_length_grouped_batches_cover_every_text_once_and_are_seeded() -> None:
    lengths = [int(x) for x in np.random.default_rng(0).integers(1, 300, 203)]

    def epoch(seed: int) -> list[list[int]]:
        return list(LengthGroupedBatches(lengths, 8, torch.Generator().manual_seed(seed),
                                         window=5))

    batches = epoch(0)
    assert len(batches) == len(LengthGroupedBatches(lengths, 8, torch.Generator(), window=5))
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert epoch(0) == batches and epoch(1) != batches
    spread = np.mean([np.ptp([lengths[i] for i in b]) for b in batches])
    assert spread < 0.5 * np.ptp(lengths)  # similar lengths share a batch


def test_the_loop_trains_text_with_class_weights(demo: LabelledTexts,
                                                 pre: TextPreprocessor) -> None:
    """The image loop, unchanged for images, takes (ids, mask) batches and class weights."""
    torch.manual_seed(0)
    splits = stratified_split(demo, seed=0)
    cfg = TextTrainConfig(epochs=2, batch_size=16, lr=2e-3, progress=False)
    model = build_transformer(TransformerConfig(vocab_size=pre.vocab_size, num_classes=11,
                                                max_length=48, d_model=32, layers=1, heads=2,
                                                ff_dim=64))
    train_set = TextDataset(splits.train, pre)
    loader = make_loader(train_set, 16, shuffle=True)
    assert isinstance(loader.batch_sampler, LengthGroupedBatches)
    weights = balanced_class_weights(splits.train.labels, 11)
    result = fit(model, train_set, TextDataset(splits.val, pre), cfg, class_weights=weights)
    assert result.epochs_run == 2 and len(result.history) == 2
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


# --- config ------------------------------------------------------------------------------------

def test_config_defaults_depend_on_the_model(tmp_path: Path) -> None:
    transformer, frozen = TextTrainConfig(), TextTrainConfig(model="minilm")
    tuned = config_from_args(["--model", "minilm", "--fine-tune", "--class-weights"])
    assert transformer.model_name == "lang-transformer" and frozen.model_name == "lang-minilm"
    assert frozen.freeze and not tuned.freeze and tuned.class_weights
    assert tuned.lr < transformer.lr and tuned.epochs < frozen.epochs
    assert TextTrainConfig(lr=0.5).lr == 0.5
    path = write_table(tmp_path / "mine.jsonl")
    cfg = config_from_args(["--data", str(path), "--text-column", "sentence",
                            "--label-column", "lang"])
    assert cfg.model_name == "text-transformer" and cfg.text_column == "sentence"


@pytest.mark.parametrize("argv", [
    ["--data", "nowhere.csv"],
    ["--model", "minilm", "--cased"],
    ["--text-column", "x", "--label-column", "x"],
    ["--model", "bert"],
    ["--freeze", "--fine-tune"],
])
def test_bad_arguments_exit_with_a_message(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        config_from_args(argv)
    assert info.value.code == 2
