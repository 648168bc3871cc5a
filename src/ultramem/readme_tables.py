"""The config classes whose field tables the README carries (see `confbase.render_field_tables`)."""

from .config import PKMConfig, UltraMemConfig
from .data import DataConfig
from .model import LMConfig
from .train import TrainConfig
from .v2 import UltraMemV2Config

CONFIG_CLASSES = {"UltraMemConfig": UltraMemConfig, "PKMConfig": PKMConfig, "LMConfig": LMConfig,
                  "TrainConfig": TrainConfig, "DataConfig": DataConfig, "UltraMemV2Config": UltraMemV2Config}
