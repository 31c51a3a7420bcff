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
    if not SHARED.is_dir():  # the real tokenizers and benchmarks; CI has them beside the clone and must use them
        if os.environ.get("REQUIRE_SHARED") == "1":
            pytest.fail(f"REQUIRE_SHARED=1 but {SHARED} is not there")
        pytest.skip("../shared is not beside this clone")
    return SHARED
