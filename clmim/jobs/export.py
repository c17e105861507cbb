"""Mode "export": the encoder of a training run's latest checkpoint as a clmim checkpoint."""
from __future__ import annotations

from typing import Optional


def run(config, workdir: str, invocation: Optional[dict] = None) -> str:
  """Exports into `<workdir>/export` and says where; returns that folder."""
  from clmim.train import trainer
  out = trainer.export_checkpoint(config, workdir, invocation=invocation)
  print(f"Exported the encoder of the latest checkpoint in {workdir} to {out}")
  return out
