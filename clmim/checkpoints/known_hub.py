"""Today's self-supervised ViTs by name: short names for `hf:` / `timm:` specs, with the facts a
user needs before downloading (encoder size, licence, access) and, for models clmim's ViT cannot
express yet, why -- so `aimv2_vitl14` is one clear line instead of a download and a refusal.

Sizes are the vision encoder's parameter counts as published (text towers, heads and decoders
excluded). Licences are the upstream releases'; the model card on the Hub is authoritative.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from clmim.errors import ClmimError


@dataclasses.dataclass(frozen=True)
class HubModel:
  """One model on the Hugging Face Hub.

  Attributes:
    spec: the `hf:` or `timm:` spec the name stands for.
    params: the vision encoder's size, as published ("86M").
    licence: the upstream licence.
    gated: what the Hub requires before downloading (None: open).
    unsupported: why clmim cannot load it yet (None: it loads).
  """
  name: str
  spec: str
  params: str
  licence: str
  description: str
  gated: Optional[str] = None
  unsupported: Optional[str] = None


_ROPE = ("EVA-02's rotary position embeddings and sub-LayerNorm SwiGLU, which clmim's ViT does "
         "not express yet (DINOv3's rotary embeddings it does)")
_CC_BY_NC = "CC BY-NC 4.0"
_DINOV3_GATE = "accept Meta's DINOv3 licence on the model's Hub page and log in"


def _models(*entries) -> dict:
  return {entry.name: entry for entry in entries}


HUB_MODELS = _models(
    HubModel("dinov2_vits14", "hf:facebook/dinov2-small", "22M", "Apache-2.0",
             "DINOv2 ViT-S/14 (LVD-142M)"),
    HubModel("dinov2_vitb14", "hf:facebook/dinov2-base", "86M", "Apache-2.0",
             "DINOv2 ViT-B/14 (LVD-142M)"),
    HubModel("dinov2_vitl14", "hf:facebook/dinov2-large", "304M", "Apache-2.0",
             "DINOv2 ViT-L/14 (LVD-142M)"),
    HubModel("dinov2_vitg14", "hf:facebook/dinov2-giant", "1.1B", "Apache-2.0",
             "DINOv2 ViT-g/14, SwiGLU (LVD-142M)"),
    HubModel("dinov2_reg_vits14", "hf:facebook/dinov2-with-registers-small", "22M",
             "Apache-2.0", "DINOv2 ViT-S/14 with 4 registers"),
    HubModel("dinov2_reg_vitb14", "hf:facebook/dinov2-with-registers-base", "86M",
             "Apache-2.0", "DINOv2 ViT-B/14 with 4 registers"),
    HubModel("dinov2_reg_vitl14", "hf:facebook/dinov2-with-registers-large", "304M",
             "Apache-2.0", "DINOv2 ViT-L/14 with 4 registers"),
    HubModel("dinov2_reg_vitg14", "hf:facebook/dinov2-with-registers-giant", "1.1B",
             "Apache-2.0", "DINOv2 ViT-g/14 with 4 registers, SwiGLU"),
    HubModel("clip_vitb16", "hf:openai/clip-vit-base-patch16", "86M", "MIT",
             "OpenAI CLIP ViT-B/16 image tower"),
    HubModel("clip_vitl14", "hf:openai/clip-vit-large-patch14", "304M", "MIT",
             "OpenAI CLIP ViT-L/14 image tower"),
    HubModel("openclip_vitb16_laion2b", "timm:vit_base_patch16_clip_224.laion2b", "86M", "MIT",
             "OpenCLIP ViT-B/16 image tower trained on LAION-2B (timm's conversion)"),
    HubModel("siglip_vitb16", "hf:google/siglip-base-patch16-224", "86M", "Apache-2.0",
             "SigLIP ViT-B/16 image tower (WebLI), no cls token"),
    HubModel("siglip_so400m14", "hf:google/siglip-so400m-patch14-384", "400M", "Apache-2.0",
             "SigLIP So400m/14 image tower at 384 px, no cls token"),
    HubModel("mae_vitb16_hf", "hf:facebook/vit-mae-base", "86M",
             f"see the model card (the MAE code is {_CC_BY_NC})",
             "MAE ViT-B/16 encoder (transformers' conversion)"),
    HubModel("ijepa_vith14", "hf:facebook/ijepa_vith14_1k", "632M",
             f"see the model card (the I-JEPA code is {_CC_BY_NC})",
             "I-JEPA ViT-H/14 target encoder, ImageNet-1k, no cls token"),
    HubModel("data2vec_vitb16", "hf:facebook/data2vec-vision-base", "86M",
             "see the model card", "data2vec vision ViT-B/16, self-supervised only"),
    HubModel("beit_vitb16_pt22k_hf", "hf:microsoft/beit-base-patch16-224-pt22k", "86M",
             "see the model card", "BEiT ViT-B/16 pretrained on ImageNet-22k, self-supervised"),
    HubModel("dino_vitb16_hf", "hf:facebook/dino-vitb16", "86M", "Apache-2.0",
             "DINO ViT-B/16 (transformers' conversion)"),
    HubModel("eva02_vitb14_mim", "timm:eva02_base_patch14_224.mim_in22k", "86M", "MIT",
             "EVA-02 ViT-B/14, masked image modelling on ImageNet-22k", unsupported=_ROPE),
    HubModel("dinov3_vits16", "hf:facebook/dinov3-vits16-pretrain-lvd1689m", "21M",
             "DINOv3 License", "DINOv3 ViT-S/16 (LVD-1689M), rotary positions, 4 registers",
             gated=_DINOV3_GATE),
    HubModel("dinov3_vitb16", "hf:facebook/dinov3-vitb16-pretrain-lvd1689m", "86M",
             "DINOv3 License", "DINOv3 ViT-B/16 (LVD-1689M), rotary positions, 4 registers",
             gated=_DINOV3_GATE),
    HubModel("dinov3_vitl16", "hf:facebook/dinov3-vitl16-pretrain-lvd1689m", "300M",
             "DINOv3 License", "DINOv3 ViT-L/16 (LVD-1689M), rotary positions, 4 registers",
             gated=_DINOV3_GATE),
    HubModel("aimv2_vitl14", "hf:apple/aimv2-large-patch14-224", "300M", "Apple AMLR",
             "AIMv2 ViT-L/14 (autoregressive image + text pretraining)",
             unsupported="the AIMv2 layout (RMSNorm, SwiGLU, no cls token), which clmim does "
                         "not read yet"),
)


def spec_of(name: str) -> str:
  """The spec a known hub name stands for; one error when clmim cannot load that model."""
  model = HUB_MODELS[name]
  if model.unsupported:
    access = f" It is also gated: {model.gated}." if model.gated else ""
    raise ClmimError(f"{name} ({model.spec}, {model.params} params, licence {model.licence}) "
                     f"uses {model.unsupported}.{access}")
  return model.spec


def table() -> str:
  """The known hub models as a markdown table (the README's, checked by a test)."""
  rows = ["| name | spec | encoder size | licence | access | loads |",
          "|---|---|---|---|---|---|"]
  for m in HUB_MODELS.values():
    rows.append(f"| `{m.name}` | `{m.spec}` | {m.params} | {m.licence} | "
                f"{'gated: ' + m.gated if m.gated else 'open'} | "
                f"{'no: ' + m.unsupported if m.unsupported else 'yes'} |")
  return "\n".join(rows)
