"""Text classification: data (demo or a user's CSV/TSV/JSONL), two models, export to the store.

``python -m training.text --model transformer|minilm`` trains one of two models with the image
path's loop (``training.loop``): a small transformer encoder trained from scratch with a BPE
tokenizer learnt from the training texts, or the pretrained all-MiniLM-L6-v2 encoder with a
classification head. Tokenization is ``preprocessing.text``, the very code the service runs.
"""
