"""The root alone (no workers) embeds tokens straight from the model file instead of packing the rows for the
wire: the logits must be bit-identical to the wire path (raw rows -> embed_rows, what every worker runs), and a
token id outside the vocabulary is refused with a clear error on both paths instead of reading past the table."""

import numpy as np
import pytest

from dllama.engine.engine import embed_rows
from dllama.errors import DllamaError
from dllama.model.gguf_model import GGUFModel
from dllama.runtime.root import Root


@pytest.fixture(scope="module")
def root(default_model):
    r = Root(GGUFModel(default_model, verbose=False), nthreads=2, max_seq=64, log=lambda *a: None)
    yield r
    r.close()


def test_local_embedding_equals_wire_path(root):
    tokens = [1, 504, 3067, 49151, 0, 17]
    fast = root.run(tokens, 0, "full").logits.copy()
    emb = root.model.embedding
    embed_rows(emb.raw_rows(tokens), emb.type, root.cfg.dim, root.engine.x)
    root.engine.forward(0, len(tokens))
    wire = root.engine.compute_logits(len(tokens) - 1)
    assert np.array_equal(fast, wire)


@pytest.mark.parametrize("bad", [-1, 49152, 10**6])
def test_token_out_of_vocabulary_is_refused(root, bad):
    with pytest.raises(DllamaError, match="token id out of range"):
        root.run([5, bad], 0, "argmax")
