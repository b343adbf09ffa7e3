"""The presets: `demo`, `demo_long` and the paper's `pixart_256`, `pixart_512`, `pixart_1024_ms` (YAML files beside
this one). A package, so that a wheel or a container install ships them and `pixart ... -c demo` finds them."""

from pathlib import Path

PRESET_DIR = Path(__file__).resolve().parent
