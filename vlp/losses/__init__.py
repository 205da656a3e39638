"""Training objectives; each works on one process and across data-parallel ranks."""
from vlp.losses.contrastive import clip_loss
from vlp.losses.siglip import siglip_loss

__all__ = ["clip_loss", "siglip_loss"]
