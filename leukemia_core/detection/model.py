"""FCOS on an ImageNet EfficientNet-Lite0 + FPN, with an attribute head on RoIAlign
features (one softmax per attribute), and the per-location weighted FCOS loss that
the sparse-annotation regimes need.

Everything but the weighting is torchvision: ``FeaturePyramidNetwork``,
``FCOS``/``FCOSHead`` (matching, decoding, NMS), ``sigmoid_focal_loss``,
``generalized_box_iou_loss`` and ``MultiScaleRoIAlign``.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.detection import FCOS
from torchvision.models.detection.fcos import FCOSHead
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign, generalized_box_iou_loss, sigmoid_focal_loss
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from leukemia_core.models import create_model
from leukemia_core.models.pretrained import PRETRAINED_CFGS
from leukemia_core.detection.data import CLASSES

LITE0 = PRETRAINED_CFGS["efficientnet_lite0"]  # the backbone's pretrained preprocessing

#: EfficientNet-Lite0 stages whose outputs feed the FPN (strides 8, 16, 32).
STAGES = {"p3": 2, "p4": 4, "p5": 6}


class LiteFPN(nn.Module):
    """EfficientNet-Lite0 trunk (stem and first two stages frozen, BatchNorm frozen)
    + torchvision ``FeaturePyramidNetwork`` with P6/P7: five maps of ``out_channels``."""

    def __init__(self, out_channels: int = 64, pretrained: bool = True):
        super().__init__()
        net = create_model("efficientnet_lite0", num_classes=0, pretrained=pretrained)
        self.stem = nn.Sequential(net.conv_stem, net.bn1)
        self.blocks = net.blocks
        chans = [self.blocks[i][-1].conv_pwl.out_channels for i in STAGES.values()]
        self.fpn = FeaturePyramidNetwork(chans, out_channels, extra_blocks=LastLevelP6P7(out_channels, out_channels))
        self.out_channels = out_channels
        for module in [self.stem, *self.blocks[:2]]:
            module.requires_grad_(False)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.modules():  # frozen statistics: batches here are small
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self

    def forward(self, x):
        x = self.stem(x)
        feats = OrderedDict()
        last = max(STAGES.values())
        for i, block in enumerate(self.blocks[: last + 1]):
            x = block(x)
            for name, j in STAGES.items():
                if i == j:
                    feats[name] = x
        return self.fpn(feats)


class WeightedFCOSHead(FCOSHead):
    """FCOS head whose loss weighs each location by ``weights`` ([N, HWA] in [0, 1]).

    Weight 0 removes a location from every loss term (it is neither positive nor
    negative); the normaliser is the weighted number of positive locations. With all
    weights 1 this is torchvision's FCOS loss.
    """

    weights: torch.Tensor | None = None

    def compute_loss(self, targets, head_outputs, anchors, matched_idxs):
        cls_logits = head_outputs["cls_logits"]
        bbox_regression = head_outputs["bbox_regression"]
        bbox_ctrness = head_outputs["bbox_ctrness"]
        w = self.weights if self.weights is not None else cls_logits.new_ones(cls_logits.shape[:2])
        gt_classes, gt_boxes = [], []
        for t, m in zip(targets, matched_idxs):
            if len(t["labels"]) == 0:
                c = t["labels"].new_zeros(len(m))
                b = t["boxes"].new_zeros((len(m), 4))
            else:
                c, b = t["labels"][m.clip(min=0)], t["boxes"][m.clip(min=0)]
            c = c.clone()
            c[m < 0] = -1
            gt_classes.append(c)
            gt_boxes.append(b)
        gt_boxes, gt_classes, anchors = torch.stack(gt_boxes), torch.stack(gt_classes), torch.stack(anchors)
        fg = gt_classes >= 0
        wf = w[fg]
        norm = wf.sum().clamp(min=1.0)
        onehot = torch.zeros_like(cls_logits)
        onehot[fg, gt_classes[fg]] = 1.0
        loss_cls = (sigmoid_focal_loss(cls_logits, onehot, reduction="none") * w[..., None]).sum()
        pred_boxes = self.box_coder.decode(bbox_regression, anchors)
        loss_reg = (generalized_box_iou_loss(pred_boxes[fg], gt_boxes[fg], reduction="none") * wf).sum()
        reg_t = self.box_coder.encode(anchors, gt_boxes)
        lr, tb = reg_t[:, :, [0, 2]], reg_t[:, :, [1, 3]]
        ctr_t = torch.sqrt((lr.min(-1)[0] / lr.max(-1)[0]) * (tb.min(-1)[0] / tb.max(-1)[0]))
        loss_ctr = (nn.functional.binary_cross_entropy_with_logits(
            bbox_ctrness.squeeze(2)[fg], ctr_t[fg], reduction="none") * wf).sum()
        return {"classification": loss_cls / norm, "bbox_regression": loss_reg / norm,
                "bbox_ctrness": loss_ctr / norm}


class AttributeHead(nn.Module):
    """``MultiScaleRoIAlign`` (P3-P5, 7x7) -> LayerNorm + MLP -> one logit vector per attribute."""

    def __init__(self, in_channels: int, n_values: dict[str, int], hidden: int = 512, dropout: float = 0.3):
        super().__init__()
        self.n_values = dict(n_values)
        self.pool = MultiScaleRoIAlign(list(STAGES), output_size=7, sampling_ratio=2)
        # LayerNorm first: the pyramid's features are unnormalised; without it the MLP
        # collapses to the majority value of most attributes.
        self.mlp = nn.Sequential(nn.Flatten(), nn.LayerNorm(in_channels * 49), nn.Linear(in_channels * 49, hidden),
                                 nn.ReLU(inplace=True), nn.Dropout(dropout),
                                 nn.Linear(hidden, sum(self.n_values.values())))

    def pooled(self, features, boxes, image_sizes):
        return self.pool(features, boxes, image_sizes)

    def classify(self, pooled: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(self.n_values, self.mlp(pooled).split(list(self.n_values.values()), dim=1)))

    def forward(self, features, boxes, image_sizes):
        return self.classify(self.pooled(features, boxes, image_sizes))


class WBCDetector(nn.Module):
    """FCOS (3 classes) on ``LiteFPN`` plus an :class:`AttributeHead`.

    ``forward(images, targets, weights_fn, targets_fn)`` in train mode returns the FCOS
    losses; ``targets_fn(detections, targets, image_list, sizes)`` may rewrite the targets
    from the model's own detections of the same forward pass (pseudo-labels), and
    ``weights_fn(anchors, targets, image_list, sizes)`` -> [N, HWA] location weights
    (None: all 1).
    In eval mode it returns per image ``boxes, scores, labels`` and ``attributes``
    (name -> [n_boxes, n_values] logits, computed on the kept boxes).
    """

    def __init__(self, attributes: dict[str, int] | None = None, short_side: int = 256, fpn_channels: int = 64,
                 head_convs: int = 2, pretrained: bool = True, score_thresh: float = 0.05,
                 detections_per_img: int = 100, attr_hidden: int = 512):
        super().__init__()
        self.config = dict(attributes=dict(attributes or {}), short_side=short_side, fpn_channels=fpn_channels,
                           head_convs=head_convs, score_thresh=score_thresh,
                           detections_per_img=detections_per_img, attr_hidden=attr_hidden, classes=CLASSES)
        backbone = LiteFPN(fpn_channels, pretrained=pretrained)
        head = WeightedFCOSHead(fpn_channels, 1, len(CLASSES), num_convs=head_convs)
        self.fcos = FCOS(backbone, num_classes=len(CLASSES), min_size=short_side, max_size=short_side * 3,
                         image_mean=list(LITE0.mean), image_std=list(LITE0.std), head=head, score_thresh=score_thresh,
                         detections_per_img=detections_per_img, topk_candidates=500)
        self.attr_head = (AttributeHead(fpn_channels, self.config["attributes"], hidden=attr_hidden)
                          if attributes else None)
        # channels-last convolutions run ~15% faster on CPU (same model, same results up
        # to float rounding)
        self.to(memory_format=torch.channels_last)

    def features(self, images, targets=None):
        """(ImageList, features dict, resized targets) after torchvision's transform."""
        image_list, targets = self.fcos.transform(list(images), targets)
        return image_list, self.fcos.backbone(image_list.tensors), targets

    def forward(self, images, targets=None, weights_fn=None, targets_fn=None):
        sizes = [tuple(im.shape[-2:]) for im in images]
        image_list, feats, targets = self.features(images, [dict(t) for t in targets] if targets else None)
        levels = list(feats.values())
        head_out = self.fcos.head(levels)
        anchors = self.fcos.anchor_generator(image_list, levels)
        per_level = [f.size(2) * f.size(3) for f in levels]
        if self.training:
            if targets_fn is not None:
                # The current model's detections on these images, decoded from this very
                # forward pass (BatchNorm is frozen and FCOS's head uses GroupNorm, so the
                # train-mode outputs equal the eval-mode ones): no second forward needed.
                with torch.no_grad():
                    split = {k: list(v.detach().split(per_level, dim=1)) for k, v in head_out.items()}
                    dets = self.fcos.postprocess_detections(split, [list(a.split(per_level)) for a in anchors],
                                                            image_list.image_sizes)
                targets = targets_fn(dets, targets, image_list, sizes)
            head = self.fcos.head
            head.weights = None if weights_fn is None else weights_fn(anchors, targets, image_list, sizes)
            try:
                return self.fcos.compute_loss(targets, head_out, anchors, per_level)
            finally:
                head.weights = None
        split = {k: list(v.split(per_level, dim=1)) for k, v in head_out.items()}
        dets = self.fcos.postprocess_detections(split, [list(a.split(per_level)) for a in anchors],
                                                image_list.image_sizes)
        if self.attr_head is not None:
            logits = self.attr_head(feats, [d["boxes"] for d in dets], image_list.image_sizes)
            counts = [len(d["boxes"]) for d in dets]
            for name, lg in logits.items():
                for d, part in zip(dets, lg.split(counts)):
                    d.setdefault("attributes", {})[name] = part
        attrs = [d.pop("attributes", {}) for d in dets]
        dets = self.fcos.transform.postprocess(dets, image_list.image_sizes, sizes)
        for d, a in zip(dets, attrs):
            d["attributes"] = a
        return dets
