import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# Real benchmark and tokenizer files live beside the repository; tests that read them skip without it.
SHARED = ROOT.parent / "shared"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def shared():
    if not SHARED.is_dir():
        pytest.skip("../shared is not beside this clone")
    return SHARED
