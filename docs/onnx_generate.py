"""Greedy generation from `nanoctl export onnx` output with onnxruntime, tokenizers and numpy alone:
python onnx_generate.py MODEL.onnx "Once upon a time" [MAX_NEW_TOKENS]   (tokenizer.json beside MODEL.onnx)"""

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

model, prompt, max_new = sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 64
tok = Tokenizer.from_file(str(Path(model).with_name("tokenizer.json")))
session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
meta = session.get_modelmeta().custom_metadata_map  # bos and stop token ids, recorded at export
stops = {int(t) for t in meta["stop_token_ids"].split(",")}
dims = lambda i: [1 if d == "batch" else 0 if isinstance(d, str) else d for d in i.shape]  # past_sequence 0
state = {i.name: np.zeros(dims(i), np.float32) for i in session.get_inputs()[1:]}  # empty caches, zero smear
ids, new = [int(meta["bos_token_id"]), *tok.encode(prompt, add_special_tokens=False).ids], []
for _ in range(max_new):  # the prompt in one call, then one token per call; present_* become past_*
    logits, *present = session.run(None, {"input_ids": np.array([ids], np.int64), **state})
    state, ids = dict(zip(state, present, strict=True)), [int(logits[0, -1].argmax())]
    if ids[0] in stops:
        break
    new += ids
print(tok.decode(new, skip_special_tokens=False))
