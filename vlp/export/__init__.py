"""Export: consolidate a DeepSpeed checkpoint (any ZeRO stage) and write it as a transformers,
open_clip or vlp model directory with a model card, optionally pushed to the Hugging Face Hub.

    from vlp.export import export
    export("runs/demo", "hf", "runs/demo/export/hf")

`vlp.load_pretrained` reads the vlp layout back. Modules: hf, openclip, vlp_format (the layouts),
transformer_ir (tower weight mapping), tokenizer_files, model_card, verify, hub, exporter (the whole
flow), cli. The checkpoint it reads is `vlp.checkpoint`'s, the model comes from `vlp.load`.
"""


def __getattr__(name):
    if name in ("export", "ExportError", "ExportResult", "supported_formats", "FORMATS"):
        from vlp.export import exporter as _export_module

        return getattr(_export_module, name)
    raise AttributeError(f"module 'vlp.export' has no attribute {name!r}")
