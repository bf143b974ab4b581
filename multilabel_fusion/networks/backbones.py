"""ImageNet CNN backbones (ResNet50, VGG16, EfficientNet-Lite0/-Lite2) as pooled-feature extractors, ensembles of
them (``name@size+name@size``: each member sees the image at its own size, features concatenated), and the
fine-tunable classifier built on one. Weights come from :mod:`multilabel_fusion.io.assets`."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..io.assets import Asset, backbone_weights
from ..settings import FEATURE_DIMS  # the backbones a setting can name

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

#: The last module of each resolution stage ("after each pooling stage"), whose outputs are pooled into the
#: multi-depth features; the final pooled vector comes after them.
DEPTH_MODULES = {
    "resnet50": ["layer1", "layer2", "layer3"],
    "vgg16": ["features.4", "features.9", "features.16", "features.23", "features.30"],
    "efficientnet_lite0": ["_blocks.0", "_blocks.2", "_blocks.4", "_blocks.10", "_blocks.15"],
    "efficientnet_lite2": ["_blocks.0", "_blocks.3", "_blocks.6", "_blocks.14", "_blocks.20"],
}


class Backbone(nn.Module):
    """A CNN that maps normalised images [B, 3, S, S] to pooled features [B, dim]."""

    def __init__(self, net: nn.Module, dim: int, mean, std, name: str, weights_used: str,
                 input_size: int | None = None, eval_transform=None):
        super().__init__()
        self.net, self.dim, self.name, self.weights_used = net, dim, name, weights_used
        self.input_size = input_size  # side of the square input it was asked to see (None: image.image_size)
        # uint8 [3, H, W] -> uint8 [3, S, S] of a decoded photo (None: squashed to S x S), see weights_transform
        self.eval_transform = eval_transform
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255)

    def normalise(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 [B,3,S,S] → float, normalised with the backbone's own statistics (done once per batch)."""
        return (images_uint8.float() - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            images = self.normalise(images)
        return self.net(images).flatten(1)


class EnsembleNet(nn.Module):
    """The members' networks on one batch of raw (0-255) images: each member resizes it to its own side
    (antialiased), normalises it with its own statistics and pools; the features are concatenated. With
    ``depth_net`` (the first member's multi-depth extractor) it returns that member's stage outputs and the
    concatenated final features, as :func:`depth_extractor` does for one network."""

    def __init__(self, nets: list[nn.Module], sizes: list[int], means: list[torch.Tensor], stds: list[torch.Tensor],
                 depth_net: nn.Module | None = None):
        super().__init__()
        self.nets, self.sizes, self.depth_net = nn.ModuleList(nets), list(sizes), depth_net
        for i, (mean, std) in enumerate(zip(means, stds)):
            self.register_buffer(f"mean{i}", mean.clone())
            self.register_buffer(f"std{i}", std.clone())

    def forward(self, images: torch.Tensor):
        finals, depths = [], None
        for i, net in enumerate(self.nets):
            x = images
            if x.shape[-1] != self.sizes[i] or x.shape[-2] != self.sizes[i]:
                x = nn.functional.interpolate(x, size=(self.sizes[i], self.sizes[i]), mode="bilinear",
                                              antialias=True, align_corners=False)
            x = (x - getattr(self, f"mean{i}")) / getattr(self, f"std{i}")
            if i == 0 and self.depth_net is not None:
                depths = self.depth_net(x)
                finals.append(depths.pop("final").flatten(1))
            else:
                finals.append(net(x).flatten(1))
        final = torch.cat(finals, 1)
        return final if depths is None else {**depths, "final": final}

    def replaced(self, nets: list[nn.Module] | None = None, depth_net: nn.Module | None = None) -> "EnsembleNet":
        """The same ensemble with other member networks (e.g. batch-norm-folded copies) or a depth extractor."""
        means = [getattr(self, f"mean{i}") for i in range(len(self.nets))]
        stds = [getattr(self, f"std{i}") for i in range(len(self.nets))]
        return EnsembleNet(list(nets or self.nets), self.sizes, means, stds, depth_net)


class BackboneEnsemble(Backbone):
    """Several backbones as one: the loader gives images at the largest member's side, :class:`EnsembleNet` runs
    every member at its own; ``dim`` is the sum. Only frozen feature extraction (fine-tuning takes one CNN)."""

    def __init__(self, members: list[Backbone], name: str):
        sizes = [int(m.input_size) for m in members]
        net = EnsembleNet([m.net for m in members], sizes, [m.mean for m in members], [m.std for m in members])
        super().__init__(net, sum(m.dim for m in members), (0.0, 0.0, 0.0), (1 / 255,) * 3, name,
                         "; ".join(f"{m.name}@{m.input_size}: {m.weights_used}" for m in members), max(sizes))
        self.member_names = [m.name for m in members]


def _architecture(name: str) -> nn.Module:
    if name.startswith("efficientnet_lite"):
        from efficientnet_lite_pytorch import EfficientNet

        return EfficientNet.from_name(name.replace("_", "-"))
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


def _published_transforms(weights: Asset):
    """torchvision's own evaluation transform object of the resolved weights (``weights.transforms()``), or None
    when they are not one torchvision backbone's (the offline EfficientNet-Lite packages publish none)."""
    published = weights.extra.get("torchvision_weights")
    if not published or weights.extra.get("members"):
        return None
    from torchvision.models import get_model_weights

    return get_model_weights(weights.name.partition("@")[0])[published].transforms()


def weights_transform(weights: Asset, setting: str) -> dict | None:
    """What ``image.eval_transform: weights`` does to the photos of these weights, as it keys the features:
    torchvision's values (resize the shorter side, centre crop, normalisation). None: the photos are squashed to
    ``image_size`` (``squash``, or weights that publish no transform), and nothing extra keys the features."""
    published = _published_transforms(weights) if setting == "weights" else None
    if published is None:
        return None
    return {"weights": weights.extra["torchvision_weights"], "resize_size": list(published.resize_size),
            "crop_size": list(published.crop_size), "interpolation": published.interpolation.value,
            "antialias": published.antialias, "mean": list(published.mean), "std": list(published.std)}


def _eval_transform(published):
    """The geometric part of torchvision's published transform, on uint8 tensors: normalising stays on the device
    (``Backbone.normalise``), so batches travel as uint8 as for every other backbone."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(published.resize_size, interpolation=published.interpolation,
                               antialias=published.antialias), T.CenterCrop(published.crop_size)])


def build_backbone(weights: Asset, image_size: int | None = None, transform: str = "squash") -> Backbone:
    """The backbone ``weights.name`` with the resolved weights (:func:`multilabel_fusion.io.assets.backbone_weights`);
    an ensemble when the asset has ``members`` (each member at its ``@size``, else ``image_size``). ``transform``
    (``image.eval_transform``): ``weights`` gives a torchvision backbone its weights' own evaluation transform
    (:func:`weights_transform`); otherwise photos are squashed to the input side."""
    if weights.extra.get("members"):
        members = [build_backbone(m, image_size) for m in weights.extra["members"]]
        return members[0] if len(members) == 1 else BackboneEnsemble(members, weights.name)
    name, _, size = weights.name.partition("@")
    if name not in FEATURE_DIMS:
        raise ValueError(f"image.backbone {name!r}: choose one of {sorted(FEATURE_DIMS)}")
    net = _architecture(name)
    if weights.path is not None:
        net.load_state_dict(_load_state_dict_file(weights.path))
    published = _published_transforms(weights)
    if published is not None:
        mean, std = published.mean, published.std
    else:
        mean, std = ((0.5,) * 3, (0.5,) * 3) if name.startswith("efficientnet_lite") else (IMAGENET_MEAN, IMAGENET_STD)
    used = weights.extra.get("description") or weights.describe()
    side = int(size) if size else image_size
    if transform == "weights" and published is not None:
        side = published.crop_size[0]
        used += f"; its transform: shorter side {published.resize_size[0]} px, centre crop {side} px"
        return Backbone(_strip_classifier(name, net), FEATURE_DIMS[name], mean, std, name, used, side,
                        _eval_transform(published))
    return Backbone(_strip_classifier(name, net), FEATURE_DIMS[name], mean, std, name, used, side)


def load_backbone(image_cfg) -> Backbone:
    """Resolve the configured backbone's weights (falling back offline, saying so) and build it."""
    size = image_cfg.get("image_size")
    return build_backbone(backbone_weights(image_cfg), int(size) if size else None,
                          image_cfg.get("eval_transform") or "squash")


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
    if isinstance(net, EnsembleNet):  # the first member's stages, every member's final features
        first = Backbone(net.nets[0], 0, (0.0,) * 3, (1.0,) * 3, backbone.member_names[0], "")
        return net.replaced(depth_net=depth_extractor(first, net.nets[0]))
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
