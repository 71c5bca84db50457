"""Evaluation tracks (classification, retrieval, generative, bits per byte) for encoders and decoders
alike, outside baselines, and the comparison tables. Each track module has `run(model, cfg) -> dict` with
its settings dataclass from `settings`; the tasks they read are in `tasks/`; `compare.compare(inputs,
out_dir)` writes the tables and plots of `twinlm compare`."""
