"""The libraries' own console output that we switch off, in one place for the CLI and the recipes."""
from __future__ import annotations

import os
import sys


def quiet_progress_bars() -> None:
    """No tqdm bars of transformers (weight loading, GGUF conversion, shard writing) or datasets.map:
    they land between our stage lines and flood Prefect and CI logs. datasets reads its switch at
    import, so it is set before that, and on the module too when it is already imported."""
    import transformers.utils.logging as transformers_logging

    transformers_logging.disable_progress_bar()
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["TQDM_DISABLE"] = "1"  # read at call time by TRL's own bars (DPO's reference log-prob pass)
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
