"""The reference models: torchvision's VGGs, and the CIFAR and GAP heads
built from torchvision's own `make_layers` and init, as a PyTorch user would."""
import torch
from torch import nn
from torchvision.models import vgg as tv

CFG_KEY = {"vgg11": "A", "vgg13": "B", "vgg16": "D", "vgg19": "E"}


def _init(module):
    # torchvision VGG.__init__'s scheme.
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.constant_(m.bias, 0)


class SmallHeadVGG(nn.Module):
    """features -> AdaptiveAvgPool2d(1) -> flatten -> classifier."""

    def __init__(self, features, classifier):
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = classifier
        _init(self)

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def build(arch, bn, head, classes, device=None, dropout=0.5):
    name = arch + ("_bn" if bn else "")
    with torch.device(device or "cpu"):
        if head == "imagenet":
            return getattr(tv, name)(weights=None, num_classes=classes, dropout=dropout)
        features = tv.make_layers(tv.cfgs[CFG_KEY[arch]], batch_norm=bn)
        if head == "cifar":
            classifier = nn.Sequential(
                nn.Linear(512, 512), nn.ReLU(True), nn.Dropout(dropout), nn.Linear(512, classes)
            )
        elif head == "gap":
            classifier = nn.Linear(512, classes)
        else:
            raise ValueError(head)
        return SmallHeadVGG(features, classifier)


def randomize_bn(model, num_batches_tracked):
    """Non-trivial BatchNorm running statistics, as a trained model has."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(num_batches_tracked)
