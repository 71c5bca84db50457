"""Evaluation tracks (classification, retrieval, generative, bits per byte) for encoders and decoders
alike, outside baselines, and the comparison report. Each track module has `run(model, ...) -> dict`;
`report.compare(inputs, out_dir)` writes the tables and plots. Heavy imports stay inside the modules."""
