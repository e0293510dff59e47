import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from llmpipe.model.gpt import GPT, GPTConfig, measure_matmul_peak_flops
from llmpipe.model.hf import export_hf_gpt2, gpt_from_hf_model, hf_model_from_gpt, load_hf_gpt2

VOCAB_SIZE = 97
BLOCK_SIZE = 16
N_LAYER = 2
N_HEAD = 2
N_EMBD = 32
# Larger than GPT-2's 0.02 so that a mis-mapped weight or bias changes logits visibly.
TEST_WEIGHT_STD = 0.2


def tiny_config(**overrides: object) -> GPTConfig:
    fields: dict = dict(
        vocab_size=VOCAB_SIZE, block_size=BLOCK_SIZE, n_layer=N_LAYER, n_head=N_HEAD, n_embd=N_EMBD
    )
    return GPTConfig(**(fields | overrides))


def tiny_gpt(seed: int = 0, **overrides: object) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny_config(**overrides)).eval()


def randomize_(module: torch.nn.Module, seed: int = 0) -> None:
    """Give every parameter, biases and LayerNorm gains included, distinct random values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * TEST_WEIGHT_STD)


def random_hf_gpt2() -> GPT2LMHeadModel:
    hf_config = GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_positions=BLOCK_SIZE,
        n_embd=N_EMBD,
        n_layer=N_LAYER,
        n_head=N_HEAD,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,
        eos_token_id=None,
    )
    torch.manual_seed(0)
    hf_model = GPT2LMHeadModel(hf_config)
    randomize_(hf_model)
    return hf_model.eval()


def random_tokens(batch_size: int = 2, length: int = BLOCK_SIZE, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB_SIZE, (batch_size, length), generator=generator)


def max_logit_diff(model: GPT, hf_model: GPT2LMHeadModel, idx: torch.Tensor) -> float:
    with torch.no_grad():
        logits, _ = model(idx)
        hf_logits = hf_model(idx).logits
    return (logits - hf_logits).abs().max().item()


# --- Hugging Face conversion -------------------------------------------------------


def test_hf_to_gpt_matches_logits() -> None:
    hf_model = random_hf_gpt2()
    model = gpt_from_hf_model(hf_model).eval()
    assert max_logit_diff(model, hf_model, random_tokens()) < 1e-4


def test_load_hf_gpt2_from_local_directory(tmp_path: Path) -> None:
    hf_model = random_hf_gpt2()
    hf_model.save_pretrained(tmp_path)
    model = load_hf_gpt2(str(tmp_path)).eval()
    assert model.config.block_size == BLOCK_SIZE
    assert max_logit_diff(model, hf_model, random_tokens()) < 1e-4


def test_hf_conversion_rejects_other_activation() -> None:
    hf_model = random_hf_gpt2()
    hf_model.config.activation_function = "relu"
    with pytest.raises(ValueError, match="activation_function"):
        gpt_from_hf_model(hf_model)


@pytest.mark.parametrize("bias", [True, False])
def test_export_round_trips_through_from_pretrained(tmp_path: Path, bias: bool) -> None:
    model = tiny_gpt(bias=bias)
    randomize_(model)
    export_hf_gpt2(model, tmp_path, eos_token_id=3)

    assert (tmp_path / "model.safetensors").is_file()
    assert (tmp_path / "config.json").is_file()
    assert not (tmp_path / "pytorch_model.bin").exists()
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert hf_model.config.eos_token_id == hf_model.config.pad_token_id == 3
    assert max_logit_diff(model, hf_model, random_tokens()) < 1e-4


def test_a_padded_vocabulary_stays_inside_the_model(tmp_path: Path) -> None:
    model = tiny_gpt(vocab_multiple=64)  # 97 -> 128 rows
    randomize_(model)
    assert model.transformer.wte.weight.shape[0] == model.lm_head.weight.shape[0] == 128
    tokens = random_tokens()
    logits, _ = model(tokens)
    assert logits.shape[-1] == VOCAB_SIZE  # the padding rows are never a prediction
    _, loss = model(tokens, tokens)
    assert torch.isfinite(loss)
    export_hf_gpt2(model, tmp_path, eos_token_id=3)
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert hf_model.config.vocab_size == VOCAB_SIZE
    assert hf_model.get_input_embeddings().weight.shape[0] == VOCAB_SIZE
    assert max_logit_diff(model, hf_model, tokens) < 1e-4


def test_export_saves_tokenizer_and_uses_its_eos(tmp_path: Path) -> None:
    class RecordingTokenizer:
        eos_token_id = 5
        saved_to: Path | None = None

        def save_pretrained(self, out_dir: Path) -> None:
            self.saved_to = out_dir

    tokenizer = RecordingTokenizer()
    export_hf_gpt2(tiny_gpt(), tmp_path, tokenizer=tokenizer)
    assert tokenizer.saved_to == tmp_path
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config.eos_token_id == 5


def test_in_memory_export_matches_without_bias() -> None:
    model = tiny_gpt(bias=False)
    randomize_(model)
    hf_model = hf_model_from_gpt(model)
    assert max_logit_diff(model, hf_model, random_tokens()) < 1e-4


# --- architecture and initialisation -------------------------------------------------


def test_lm_head_is_tied_to_token_embedding() -> None:
    model = tiny_gpt()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_residual_projections_get_scaled_init() -> None:
    n_layer = 8
    torch.manual_seed(0)
    model = GPT(tiny_config(n_layer=n_layer, n_embd=128, n_head=4))
    expected_residual_std = 0.02 / math.sqrt(2 * n_layer)
    for name, param in model.named_parameters():
        if name.endswith("c_proj.weight"):
            assert param.std().item() == pytest.approx(expected_residual_std, rel=0.2), name
        elif name.endswith(("c_attn.weight", "c_fc.weight")):
            assert param.std().item() == pytest.approx(0.02, rel=0.2), name
        elif name.endswith(".bias"):
            assert torch.count_nonzero(param) == 0, name


def test_forward_returns_logits_without_targets_and_the_loss_with_them() -> None:
    model = tiny_gpt()
    idx = random_tokens(length=8)
    targets = random_tokens(length=8, seed=2)
    logits, no_loss = model(idx)
    assert logits.shape == (2, 8, VOCAB_SIZE) and no_loss is None
    no_logits, loss = model(idx, targets)
    expected = torch.nn.functional.cross_entropy(logits.view(-1, VOCAB_SIZE), targets.view(-1))
    assert no_logits is None and torch.allclose(loss, expected)

    ignored = targets.clone()
    ignored[:, :4] = -100
    _, loss_ignoring = model(idx, ignored)
    expected = torch.nn.functional.cross_entropy(
        logits[:, 4:].reshape(-1, VOCAB_SIZE), targets[:, 4:].reshape(-1)
    )
    assert torch.allclose(loss_ignoring, expected)


@pytest.mark.parametrize("bf16", [False, True])
def test_chunked_linear_cross_entropy_matches_the_usual_loss_and_gradients(bf16) -> None:
    from llmpipe.model.loss import linear_cross_entropy

    torch.manual_seed(0)
    x = torch.randn(300, 32, requires_grad=True)
    weight = torch.randn(50, 32, requires_grad=True)
    targets = torch.randint(50, (300,))
    targets[:40] = -100
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    with autocast:
        expected = torch.nn.functional.cross_entropy((x @ weight.t()).float(), targets)
    expected.backward()
    expected_grads = x.grad.clone(), weight.grad.clone()
    x.grad = weight.grad = None
    with autocast:
        loss = linear_cross_entropy(x, weight, targets, chunk_rows=64)  # 5 chunks, last short
    (3 * loss).backward()  # the backward pass scales by the incoming gradient
    tolerance = 1e-2 if bf16 else 1e-6
    assert loss.item() == pytest.approx(expected.item(), rel=tolerance)
    for grad, expected_grad in zip((x.grad, weight.grad), expected_grads, strict=True):
        expected_grad = 3 * expected_grad
        assert torch.allclose(grad, expected_grad, atol=tolerance * expected_grad.abs().max())
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), autocast, FlopCounterMode(display=False) as flops:
        assert linear_cross_entropy(x, weight, targets).item() == pytest.approx(loss.item())
    assert flops.get_total_flops() == 2 * 300 * 32 * 50  # evaluation: the logits matmul only


def test_gelu_tanh_sigmoid_form_is_the_tanh_gelu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The form gelu_tanh takes under torch.compile, run eagerly: values and gradients."""
    from llmpipe.model.gpt import gelu_tanh

    x = torch.linspace(-6, 6, 1201, dtype=torch.float64, requires_grad=True)
    expected = torch.nn.functional.gelu(x, approximate="tanh")
    (expected_grad,) = torch.autograd.grad(expected.sum(), x)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    value = gelu_tanh(x)
    (grad,) = torch.autograd.grad(value.sum(), x)
    assert torch.allclose(value, expected, rtol=0, atol=1e-12)
    assert torch.allclose(grad, expected_grad, rtol=0, atol=1e-12)


def test_compiled_training_step_matches_eager() -> None:
    """The pretrain stage's `compile: true` path (where the MLP's GELU takes its sigmoid form)."""
    idx, targets = random_tokens(length=8), random_tokens(length=8, seed=2)
    results = []
    for compiled in (False, True):
        model = tiny_gpt().train()
        randomize_(model)  # large pre-activations, so every term of the GELU matters
        step = torch.compile(model) if compiled else model
        _, loss = step(idx, targets)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    assert torch.allclose(compiled_loss, eager_loss, rtol=1e-5)
    for name, grad in eager_grads.items():
        assert torch.allclose(compiled_grads[name], grad, atol=1e-5 * grad.abs().max()), name


def test_sequence_longer_than_block_size_is_rejected() -> None:
    with pytest.raises(ValueError, match=f"length {BLOCK_SIZE + 1}.*block_size is only"):
        tiny_gpt()(random_tokens(length=BLOCK_SIZE + 1))


def test_num_params_counts_by_hand() -> None:
    model = tiny_gpt()
    C = N_EMBD
    layer_norms = 2 * (2 * C)
    attention = (3 * C * C + 3 * C) + (C * C + C)  # c_attn, c_proj
    mlp = (4 * C * C + 4 * C) + (4 * C * C + C)  # c_fc, c_proj
    per_layer = layer_norms + attention + mlp
    token_embedding = VOCAB_SIZE * C  # shared with lm_head, counted once
    non_embedding = token_embedding + N_LAYER * per_layer + 2 * C
    assert model.num_params(non_embedding=True) == non_embedding == 28_576
    assert model.num_params() == non_embedding + BLOCK_SIZE * C


# --- optimiser and throughput accounting ---------------------------------------------


def test_configure_optimizers_decays_only_matrices() -> None:
    model = tiny_gpt()
    optimizer = model.configure_optimizers(
        weight_decay=0.1, learning_rate=1e-3, betas=(0.9, 0.95), device_type="cpu"
    )
    decay_group, no_decay_group = optimizer.param_groups
    assert decay_group["weight_decay"] == 0.1
    assert no_decay_group["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay_group["params"])
    assert all(p.dim() < 2 for p in no_decay_group["params"])

    grouped = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for p in model.parameters()}
    assert optimizer.defaults["fused"]


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest() -> None:
    model = tiny_gpt()
    optimizers = model.configure_optimizers(
        weight_decay=0.1,
        learning_rate=1e-3,
        betas=(0.9, 0.95),
        device_type="cpu",
        optimizer="muon",
    )
    muon, adamw = optimizers.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    in_adamw = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert in_muon == {
        n for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2
    }
    assert {"transformer.wte.weight", "transformer.wpe.weight"} <= in_adamw  # wte is the head
    assert not in_muon & in_adamw and in_muon | in_adamw == set(names.values())
    # The schedule sets every group's rate; one step moves every parameter; the state round-trips.
    for group in optimizers.param_groups:
        group["lr"] = 1e-2
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randint(0, VOCAB_SIZE, (2, BLOCK_SIZE))
    model(x, x)[1].backward()
    optimizers.step()
    optimizers.zero_grad()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())
    state = optimizers.state_dict()
    again = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu", "muon")
    again.load_state_dict(state)
    momentum = next(iter(again.optimizers[0].state.values()))["momentum_buffer"]
    assert torch.equal(momentum, next(iter(muon.state.values()))["momentum_buffer"])


def test_estimate_mfu_by_hand() -> None:
    model = tiny_gpt()
    head_size = N_EMBD // N_HEAD
    flops_per_token = 6 * 28_576 + 12 * N_LAYER * N_HEAD * head_size * BLOCK_SIZE  # 183_744
    assert model.flops_per_token() == flops_per_token
    assert model.estimate_mfu(tokens_per_second=1_000, peak_flops=1e9) == pytest.approx(0.183744)


def test_measure_matmul_peak_flops_is_positive() -> None:
    flops = measure_matmul_peak_flops(n=128, repeats=2)
    assert math.isfinite(flops) and flops > 0


# --- generation ----------------------------------------------------------------------


def greedy_rollout(model: GPT, idx: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -BLOCK_SIZE:])
        idx = torch.cat((idx, logits[:, -1].argmax(dim=-1, keepdim=True)), dim=1)
    return idx


@pytest.fixture
def sampling_model() -> GPT:
    model = tiny_gpt()
    randomize_(model)  # peaked distributions, so greedy and sampling visibly differ
    return model


def test_generate_is_reproducible_from_seed(sampling_model: GPT) -> None:
    prompt = random_tokens(length=4)

    def sample(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return sampling_model.generate(prompt, 12, temperature=1.5, generator=generator)

    first = sample(0)
    assert first.shape == (2, 16)
    assert torch.equal(first[:, :4], prompt)
    assert torch.equal(first, sample(0))
    assert not torch.equal(first, sample(1))


def test_generate_greedy_variants_equal_argmax_rollout(sampling_model: GPT) -> None:
    # 6 + 14 tokens exceeds block_size, so context cropping is exercised too.
    prompt = random_tokens(length=6)
    expected = greedy_rollout(sampling_model, prompt, 14)
    assert torch.equal(sampling_model.generate(prompt, 14, temperature=0.0), expected)
    for filtering in (dict(top_k=1), dict(top_p=1e-6)):
        generator = torch.Generator().manual_seed(0)
        sampled = sampling_model.generate(prompt, 14, generator=generator, **filtering)
        assert torch.equal(sampled, expected), filtering


def test_generate_stops_when_every_row_has_emitted_eos(monkeypatch: pytest.MonkeyPatch) -> None:
    eos, other = 7, 11
    prompt_length = 3
    # Row 0 emits eos at its 1st new token, row 1 at its 3rd; afterwards the model
    # would have row 0 continue with `other`, which generate must override with eos.
    eos_step = torch.tensor([0, 2])
    model = tiny_gpt()

    def scripted_forward(idx: torch.Tensor) -> tuple[torch.Tensor, None]:
        step = idx.size(1) - prompt_length
        logits = torch.zeros(idx.size(0), idx.size(1), VOCAB_SIZE)
        next_tokens = torch.where(eos_step == step, eos, other)
        logits[torch.arange(idx.size(0)), -1, next_tokens] = 1.0
        return logits, None

    monkeypatch.setattr(model, "forward", scripted_forward)
    prompt = torch.zeros(2, prompt_length, dtype=torch.long)
    out = model.generate(prompt, max_new_tokens=10, temperature=0.0, eos_token_id=eos)
    assert out[:, prompt_length:].tolist() == [[eos, eos, eos], [other, other, eos]]


@pytest.mark.parametrize("bf16", [False, True])
def test_the_chunked_and_the_full_logits_loss_agree(bf16) -> None:
    """pretrain.chunked_loss switches the path, not the result: loss and gradients agree."""
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=300, block_size=16, n_layer=2, n_head=2, n_embd=32, vocab_multiple=64
    )  # padded rows take part in both softmaxes
    model = GPT(config)
    idx = torch.randint(300, (4, 16))
    targets = torch.randint(300, (4, 16))
    targets[0, :5] = -100
    results = []
    for chunked in (True, False):
        model.config.chunked_loss = chunked
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(idx, targets)[1]
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (chunked_loss, chunked_grads), (full_loss, full_grads) = results
    tolerance = 1e-2 if bf16 else 1e-5  # bf16: the logits are rounded at different points
    assert torch.allclose(chunked_loss, full_loss, atol=tolerance, rtol=0)
    for a, b in zip(chunked_grads, full_grads, strict=True):
        assert torch.allclose(a, b, atol=tolerance, rtol=0)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients() -> None:
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(vocab_size=100, block_size=16, n_layer=3, n_head=2, n_embd=32, dropout=0.1)
    )
    idx, targets = torch.randint(100, (2, 16)), torch.randint(100, (2, 16))
    results = []
    for checkpointed in (False, True):
        model.config.gradient_checkpointing = checkpointed
        model.zero_grad()
        torch.manual_seed(1)  # the same dropout masks: recomputation replays the RNG state
        loss = model(idx, targets)[1]
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    assert results[0][0] == pytest.approx(results[1][0], abs=1e-6)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        assert torch.allclose(a, b, atol=1e-6)
