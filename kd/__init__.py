from kd import models  # noqa: F401  registers the cifar_* models in timm
