"""Text-guided vision-language classification (book chapter 05_vision_language).

Images and descriptive sentences are embedded in one space by a CLIP-style model: an
ImageNet EfficientNet-Lite0 image tower and an all-MiniLM-L6-v2 text tower, trained with
a multi-positive symmetric InfoNCE. Classes are predicted by their descriptions
(zero-shot prompts), cells are retrieved by their WBCAtt attribute sentences.
"""
from leukemia_core.vl.config import VL_SIZES, vl_sizes
from leukemia_core.vl.data import (GROUPS, IndexedDataset, LabelledView, TextBank, eval_view, heldout_split, load_vl_table,
                   prepare_vl, task_group, text_class_groups)
from leukemia_core.vl.evaluate import (attribute_readout, embed_images, linear_probe, prompt_embeddings, random_recall_at_k,
                       recall_at_k, retrieval_report, zero_shot_logits, zero_shot_metrics)
from leukemia_core.losses.vision_language import multi_positive_info_nce, positives_from_keys
from leukemia_core.vl.model import ImageTower, TextTower, VisionLanguageModel, VLModelConfig, build_vl_model
from leukemia_core.vl.texts import attribute_sentence, class_prompts, class_texts, templates, value_sentences
from leukemia_core.vl.train import VLFitConfig, fit_vl, load_vl, save_vl

__all__ = [
    "GROUPS", "VL_SIZES", "ImageTower", "IndexedDataset", "LabelledView", "TextBank", "TextTower",
    "VLFitConfig",
    "VLModelConfig", "VisionLanguageModel", "attribute_readout", "attribute_sentence", "build_vl_model",
    "class_prompts", "class_texts", "embed_images", "eval_view", "fit_vl", "heldout_split", "linear_probe",
    "load_vl", "load_vl_table", "multi_positive_info_nce", "positives_from_keys", "prepare_vl", "prompt_embeddings",
    "random_recall_at_k", "recall_at_k", "retrieval_report", "save_vl", "task_group", "templates",
    "text_class_groups", "value_sentences", "vl_sizes", "zero_shot_logits", "zero_shot_metrics",
]
