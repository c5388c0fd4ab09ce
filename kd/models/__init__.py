"""The models, registered in timm's registry on import: kd's CIFAR ResNets (`resnet`) and the
KD papers' CIFAR zoo (`zoo`), with the named feature taps the distillers read."""

from kd.models import zoo  # noqa: F401  (registers the cifar_rd_* models)
from kd.models.resnet import CIFAR10_MEAN, CIFAR10_STD, CifarResNet, TapError, TapNet, list_taps  # noqa: F401
