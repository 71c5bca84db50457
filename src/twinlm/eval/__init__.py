"""Evaluation tracks (classification, retrieval, generative, bits per byte, minimal pairs) for encoders and
decoders alike, outside baselines, and the comparison tables. Each track module has `run(model, cfg) -> dict`
with its settings dataclass from `settings`, and `tracks` registers each once (name, settings, module) for
`twinlm eval`, `eval curve` and the suite; the tasks they read are in `tasks/`; `compare.compare(inputs,
out_dir)` writes the tables and plots of `twinlm compare`."""
