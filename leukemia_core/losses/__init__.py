"""Losses of the method chapters: vision-language contrastive (``vision_language``), imbalance and
contrastive domain terms (``imbalance``)."""
