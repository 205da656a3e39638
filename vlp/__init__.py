"""vlp: vision-language pretraining on WebDataset shards with DeepSpeed.

`vlp.load_pretrained(DIR or ORG/NAME)` loads a `vlp export --format vlp` model; it is imported on
first use so that `import vlp` stays light.
"""


def __getattr__(name):
    if name in ("load_pretrained", "load_tokenizer"):
        from vlp import load

        return getattr(load, name)
    raise AttributeError(f"module 'vlp' has no attribute {name!r}")
