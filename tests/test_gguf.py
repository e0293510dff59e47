"""GGUF export (llmpipe.export.gguf): the file reads back with gguf's own reader, says what
llama.cpp needs (architecture, hyperparameters, the gpt2 BPE with the gpt-2 pre-tokenizer), and a
plain NumPy forward over its F16 tensors gives the HF model's greedy tokens with logits within
0.02; Q8_0 within its coarser rounding. llama.cpp itself: make gguf-parity (not in CI)."""

import json

import numpy as np
import pytest
import torch

from conftest import save_micro_model
from llmpipe.errors import DataError
from llmpipe.export.gguf import NumpyGpt2, read_gguf, write_gguf

PROMPT_IDS = [5, 17, 42, 99, 3, 250, 7]


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gpt2")
    # n_embd 32: Q8_0's rows are whole 32-value blocks
    model = save_micro_model(directory, seed=4, n_positions=64)
    return directory, model


def hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def hf_greedy(model, ids: list[int], new_tokens: int) -> list[int]:
    out = model.generate(
        torch.tensor([ids]),
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=model.config.eos_token_id,
    )
    return out[0, len(ids) :].tolist()


def test_f16_reads_back_with_what_llama_cpp_needs_and_matches_the_hf_model(micro, tmp_path):
    directory, model = micro
    written = write_gguf(directory, tmp_path / "m-f16.gguf", "f16", "micro")
    metadata, tensors = read_gguf(written.path)
    assert metadata["general.architecture"] == "gpt2"
    assert metadata["gpt2.block_count"] == 2 and metadata["gpt2.embedding_length"] == 32
    assert metadata["gpt2.context_length"] == 64 and metadata["gpt2.attention.head_count"] == 2
    assert metadata["tokenizer.ggml.model"] == "gpt2"
    assert metadata["tokenizer.ggml.pre"] == "gpt-2"
    spec = json.loads((directory / "tokenizer.json").read_text())
    assert len(metadata["tokenizer.ggml.tokens"]) == model.config.vocab_size
    assert len(metadata["tokenizer.ggml.merges"]) == len(spec["model"]["merges"])
    assert metadata["tokenizer.ggml.eos_token_id"] == model.config.eos_token_id
    assert "output.weight" not in tensors  # tied: llama.cpp reads token_embd
    assert written.tensor_types["blk.0.attn_qkv.weight"] == "F16"
    assert written.tensor_types["position_embd.weight"] == "F32"
    # (out, in), as llama.cpp multiplies
    assert tensors["blk.0.attn_qkv.weight"].shape == (96, 32)

    numpy_model = NumpyGpt2.from_file(written.path)
    # the stage checks the values as written: the same as read back
    assert np.array_equal(
        NumpyGpt2.from_written(written).logits(PROMPT_IDS), numpy_model.logits(PROMPT_IDS)
    )
    difference = np.abs(numpy_model.logits(PROMPT_IDS) - hf_logits(model, PROMPT_IDS)).max()
    assert difference <= 0.02
    assert numpy_model.greedy(PROMPT_IDS, 12) == hf_greedy(model, PROMPT_IDS, 12)


def test_q8_0_quantizes_the_matrices_and_stays_close(micro, tmp_path):
    directory, model = micro
    written = write_gguf(directory, tmp_path / "m-q8_0.gguf", "q8_0", "micro")
    assert written.tensor_types["blk.1.ffn_up.weight"] == "Q8_0"
    assert written.tensor_types["blk.1.ffn_up.bias"] == "F32"
    f16 = write_gguf(directory, tmp_path / "m-f16.gguf", "f16", "micro")
    assert written.bytes < f16.bytes
    read_back = NumpyGpt2.from_file(written.path).logits(PROMPT_IDS)
    assert np.array_equal(NumpyGpt2.from_written(written).logits(PROMPT_IDS), read_back)
    difference = np.abs(read_back - hf_logits(model, PROMPT_IDS)).max()
    assert 0 < difference <= 0.1


def test_a_tokenizer_that_does_not_split_as_gpt2_is_refused(micro, tmp_path):
    import shutil

    directory, _ = micro
    other = tmp_path / "other"
    shutil.copytree(directory, other)
    spec = json.loads((other / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    (other / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(DataError, match=r"tokenizer.json: pre_tokenizer: 'Whitespace' does not"):
        write_gguf(other, tmp_path / "x.gguf", "f16", "x")
    assert not (tmp_path / "x.gguf").exists()
