"""SmolTalk (HuggingFaceTB/smol-smoltalk): general chat; train 460K rows, test 24K.

Local format: jsonl or parquet rows with a `messages` list (the hub's columns), e.g. `smoltalk/train.jsonl`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from nanoctl.conversations import validate_conversation
from nanoctl.errors import UsageError
from nanoctl.home import Home
from nanoctl.tasks.common import Conversation, LocalOrHub, find_local, load_hub, local_rows


class SmolTalk(LocalOrHub):
    name = "SmolTalk"
    eval_type = "generative"

    def __init__(
        self,
        split: str = "train",
        *,
        path: str | os.PathLike[str] | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        home: Home | None = None,
        **kwargs: Any,
    ) -> None:
        if split not in ("train", "test"):
            raise UsageError(f"SmolTalk split must be train|test, got {split!r}")
        self.split = split
        cands = [
            f"smoltalk/{split}.jsonl",
            f"smoltalk/{split}.parquet",
            f"smoltalk/data/{split}-*.parquet",
            f"smol-smoltalk/{split}.jsonl",
            f"smol-smoltalk/data/{split}-*.parquet",
        ]
        local = Path(path) if path else find_local(cands, data_dir, home)
        if local is not None:
            rows: Any = local_rows(local)
            source = str(local)
        else:
            rows = load_hub(
                "HuggingFaceTB/smol-smoltalk",
                None,
                split,
                what=f"SmolTalk {split} split",
                expected=f"smoltalk/{split}.jsonl or .parquet (rows with a 'messages' list)",
                data_dir=data_dir,
                home=home,
            )
            source = "hf:HuggingFaceTB/smol-smoltalk"
        super().__init__(rows, source, **kwargs)

    def get_example(self, index: int) -> Conversation:
        row = self.rows[index]
        # an optional system message is kept; render_conversation folds it into the first user turn
        return validate_conversation({"messages": list(row["messages"])}, f"{self.source} row {index}")
