"""The jobs `clmim.main` runs: the only code that wires configs, models, data and analyses
together (`clmim.analysis` and `clmim.train` never import each other, and `clmim.analysis`
never imports `clmim.data` or `clmim.checkpoints`).

- `analyze`: the analyses of an analysis config over every model (results.json, figures,
  summary, report);
- `snapshots`: the same analyses over every kept checkpoint of a training run.
Pretraining and export are `clmim.train.trainer.train` / `export_checkpoint`.
"""
