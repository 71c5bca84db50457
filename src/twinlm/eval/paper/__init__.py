"""The paper's own evaluation protocols, run through the libraries that define them.

- GLUE fine-tuning sweeps (`glue*.py`: `datasets` + HF `Trainer`, ModernBERT's task table, MNLI warm start);
- MS MARCO fine-tuning then MTEB retrieval (`msmarco.py`, `mteb_*.py`: sentence-transformers' trainer, `mteb`);
- the three columns together beside the paper's published numbers (`reference.py`, `plan.py`, `table.py`,
  `columns.py`: `twinlm eval paper`).

The laptop tracks (eval/classify.py, eval/retrieval.py) stay the suite's CPU defaults; these need the `paper` extra
(`pip install 'twinlm[paper]'`) and, for the paper's numbers, a GPU and internet access (the hub's datasets).
"""
