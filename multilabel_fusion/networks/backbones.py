"""ImageNet CNN backbones (ResNet50, VGG16, EfficientNet-Lite0) as pooled-feature extractors, and the
fine-tunable classifier built on one. Weights come from :mod:`multilabel_fusion.assets`."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..assets import Asset, backbone_weights

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FEATURE_DIMS = {"resnet50": 2048, "vgg16": 4096, "efficientnet_lite0": 1280}

#: The last module of each resolution stage ("after each pooling stage"), whose outputs are pooled into the
#: multi-depth features; the final pooled vector comes after them.
DEPTH_MODULES = {
    "resnet50": ["layer1", "layer2", "layer3"],
    "vgg16": ["features.4", "features.9", "features.16", "features.23", "features.30"],
    "efficientnet_lite0": ["_blocks.0", "_blocks.2", "_blocks.4", "_blocks.10", "_blocks.15"],
}


class Backbone(nn.Module):
    """A CNN that maps normalised images [B, 3, S, S] to pooled features [B, dim]."""

    def __init__(self, net: nn.Module, dim: int, mean, std, name: str, weights_used: str):
        super().__init__()
        self.net, self.dim, self.name, self.weights_used = net, dim, name, weights_used
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255)

    def normalise(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 [B,3,S,S] → float, normalised with the backbone's own statistics (done once per batch)."""
        return (images_uint8.float() - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            images = self.normalise(images)
        return self.net(images).flatten(1)


def _architecture(name: str) -> nn.Module:
    if name == "efficientnet_lite0":
        from efficientnet_lite_pytorch import EfficientNet

        return EfficientNet.from_name("efficientnet-lite0")
    from torchvision import models

    return models.resnet50() if name == "resnet50" else models.vgg16()


def _strip_classifier(name: str, net: nn.Module) -> nn.Module:
    if name == "resnet50":
        net.fc = nn.Identity()
    elif name == "vgg16":
        net.classifier = net.classifier[:-1]  # keep fc6/fc7: the 4096-d penultimate features
    else:
        net._fc = nn.Identity()
    return net


def _load_state_dict_file(path: Path) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def build_backbone(weights: Asset) -> Backbone:
    """The backbone ``weights.name`` with the resolved weights (:func:`multilabel_fusion.assets.backbone_weights`)."""
    name = weights.name
    if name not in FEATURE_DIMS:
        raise ValueError(f"image.backbone {name!r}: choose one of {sorted(FEATURE_DIMS)}")
    net = _architecture(name)
    if weights.path is not None:
        net.load_state_dict(_load_state_dict_file(weights.path))
    mean, std = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)) if name == "efficientnet_lite0" else (IMAGENET_MEAN, IMAGENET_STD)
    used = weights.extra.get("description") or weights.describe()
    return Backbone(_strip_classifier(name, net), FEATURE_DIMS[name], mean, std, name, used)


def load_backbone(image_cfg) -> Backbone:
    """Resolve the configured backbone's weights (falling back offline, saying so) and build it."""
    return build_backbone(backbone_weights(image_cfg))


class ImageClassifier(nn.Module):
    """Backbone + 18-way linear head, trained end to end (the published first network)."""

    def __init__(self, backbone: Backbone, num_classes: int = 18):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


def depth_extractor(backbone: Backbone, net: nn.Module | None = None) -> nn.Module:
    """A copy of the backbone's network (or of ``net``, e.g. its batch-norm-folded version) that returns
    ``{depth0: output of the first stage of DEPTH_MODULES, ..., final: the pooled features}`` in one forward
    pass (torchvision's feature extraction, traced with torch.fx)."""
    import re
    import warnings

    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    net = (backbone.net if net is None else net).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        train_names, eval_names = get_graph_node_names(net)

    def nodes(names: list[str]) -> dict[str, str]:
        last: dict[str, str] = {}
        for name in names:
            for module in DEPTH_MODULES[backbone.name]:
                if name == module or re.match(re.escape(module) + r"\.", name):
                    last[module] = name
        chosen = {last[m]: f"depth{i}" for i, m in enumerate(DEPTH_MODULES[backbone.name])}
        chosen[names[-1]] = "final"
        return chosen

    with warnings.catch_warnings():  # torchvision's note that eval-mode nodes are a subset: we name both
        warnings.simplefilter("ignore", UserWarning)
        return create_feature_extractor(net, train_return_nodes=nodes(train_names),
                                        eval_return_nodes=nodes(eval_names))
