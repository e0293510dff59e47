"""A GPT-2 language model in plain PyTorch.

Module and parameter names follow nanoGPT and Hugging Face's GPT-2 exactly, so a
checkpoint converts between the two by transposing a few weights and nothing else
(see ``llmpipe.model.hf``).

Shape legend used in the comments:
    B: batch size, T: sequence length, C: embedding width (n_embd),
    nh: number of heads, hs: head size (C // nh), V: vocabulary size.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from llmpipe.model.loss import IGNORE_INDEX, linear_cross_entropy

# Hugging Face GPT-2's layer_norm_epsilon; matching it keeps converted logits identical.
LAYER_NORM_EPS = 1e-5
INIT_STD = 0.02


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0
    bias: bool = True
    # The embedding and head get rows up to a multiple of this (GPT-2's 50257 -> 50304 with
    # 64): matmul shapes the GPU's kernels tile well. The extra rows are never a target; as in
    # nanoGPT they take part in the training softmax (and learn to be improbable), while
    # predictions, evaluation and the export use the real rows only.
    vocab_multiple: int = 1
    # How training computes, not what the model is (neither is exported):
    # the loss chunk by chunk without materialising the (B*T, V) logits (model/loss.py): faster
    # on a CPU, where the logits leave the cache, and the memory of one chunk at a large
    # vocabulary; on a GPU where the logits fit, the fused full-logits path is faster.
    chunked_loss: bool = True
    # Recompute each block's activations in the backward pass instead of keeping them: about a
    # third more compute for activation memory of one block instead of n_layer.
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float
) -> torch.Tensor:
    """Causal scaled dot-product attention: flash attention on a GPU.

    Under bf16 autocast on a CPU the attention runs in fp32: there PyTorch's flash kernel is
    about twice as slow in bf16 as in fp32 at GPT-2's small head sizes (bench/README.md).
    """
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            y = F.scaled_dot_product_attention(
                q.float(), k.float(), v.float(), dropout_p=dropout_p, is_causal=True
            )
        return y.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        # One fused projection for query, key and value: a single large matmul is
        # faster than three small ones, and it is GPT-2's checkpoint layout.
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # each (B, T, C)
        head_size = C // self.n_head
        q = q.view(B, T, self.n_head, head_size).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, head_size).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, head_size).transpose(1, 2)  # (B, nh, T, hs)
        y = causal_attention(q, k, v, self.dropout if self.training else 0.0)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads side by side
        return self.resid_dropout(self.c_proj(y))


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation, which GPT-2 was trained with ("gelu_new" in HF).

    Under torch.compile on a CPU it is written as x * sigmoid(2u), the same function as
    0.5 x (1 + tanh u): Inductor's vectorised CPU tanh is slow, its exp is not, and the
    sigmoid form fuses into one loop forward and one backward, about 2x faster than ATen's kernel
    at 8x256x1024 in bf16 (bench/README.md). Eager mode keeps ATen's single kernel.
    """
    if x.device.type == "cpu" and torch.compiler.is_compiling():
        u = math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)
        return x * torch.sigmoid(2 * u)
    return F.gelu(x, approximate="tanh")


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c_fc(x)  # (B, T, 4C)
        x = gelu_tanh(x)
        x = self.c_proj(x)  # (B, T, C)
        return self.dropout(x)


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=LAYER_NORM_EPS, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=LAYER_NORM_EPS, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Pre-norm residual block: the residual stream itself is never normalised.
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=LAYER_NORM_EPS, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        # Weight tying (as in GPT-2): the output projection reuses the token embedding.
        self.transformer.wte.weight = self.lm_head.weight

        self.apply(self._init_weights)
        # GPT-2 paper: scale the projections that write into the residual stream by
        # 1/sqrt(number of residual layers) so its variance does not grow with depth.
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=INIT_STD / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)

    def num_params(self, non_embedding: bool = False) -> int:
        """Number of parameters, each shared tensor counted once.

        With ``non_embedding`` the position embedding is left out (nanoGPT's
        convention). The token embedding stays in: it is tied to ``lm_head``, whose
        matmul is real compute.
        """
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Return ``(logits, loss)``: without targets, the (B, T, V) logits and None; with
        targets (the shape of ``idx``, -100 ignored), None and the mean cross-entropy.

        With targets the logits are never materialised: ``linear_cross_entropy`` computes the
        loss and its gradient chunk by chunk (at the embedded default the (B*T, V) logits
        and their gradient are most of the step's memory traffic).
        """
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(
                f"Cannot forward a sequence of length {T}: "
                f"block_size is only {self.config.block_size}"
            )
        pos = torch.arange(T, dtype=torch.long, device=idx.device)  # (T,)

        tok_emb = self.transformer.wte(idx)  # (B, T, C)
        pos_emb = self.transformer.wpe(pos)  # (T, C), broadcast over the batch
        x = self.transformer.drop(tok_emb + pos_emb)
        checkpointed = (
            self.config.gradient_checkpointing and self.training and torch.is_grad_enabled()
        )
        for block in self.transformer.h:
            # Non-reentrant: it restores the RNG state, so dropout draws the same masks again.
            x = checkpoint(block, x, use_reentrant=False) if checkpointed else block(x)
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x)[..., : self.config.vocab_size], None  # (B, T, V)
        if self.config.chunked_loss:
            loss = linear_cross_entropy(x.view(B * T, -1), self.lm_head.weight, targets.reshape(-1))
        else:  # the padded rows take part in the softmax here too, as in the chunked path
            logits = self.lm_head(x).float()  # (B, T, padded V)
            loss = F.cross_entropy(
                logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX
            )
        return None, loss

    def configure_optimizers(
        self,
        weight_decay: float,
        learning_rate: float,
        betas: tuple[float, float],
        device_type: str,
        optimizer: str = "adamw",
    ) -> torch.optim.Optimizer | Optimizers:
        """AdamW that decays matmul weights and embeddings only; or, for `optimizer="muon"`,
        Muon for the blocks' 2-D weights beside that AdamW for the rest.

        Biases and LayerNorm gains (the 1-D tensors) are left undecayed: shrinking
        them towards zero only fights the normalisation. Muon orthogonalises the update of a
        hidden matrix; the embeddings (the token embedding is also the head) and the gains stay
        with AdamW, as in Jordan et al.'s and Moonshot's Muon. Muon's step is scaled to
        AdamW's update size (`match_rms_adamw`, Liu et al. 2025), so the two share the learning
        rate, its schedule and the weight decay.
        """
        params = [p for p in self.parameters() if p.requires_grad]
        hidden = (
            {id(p) for p in self.transformer.h.parameters() if p.dim() == 2}
            if optimizer == "muon"
            else set()
        )
        matrices = [p for p in params if p.dim() >= 2 and id(p) not in hidden]
        param_groups = [
            {"params": matrices, "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        # The fused kernel (one pass over all parameters) exists on CUDA and CPU; on this
        # project's 2-core CPU it is 6x faster than the per-parameter loop (bench/README.md).
        adamw = torch.optim.AdamW(
            param_groups, lr=learning_rate, betas=betas, fused=device_type in ("cuda", "cpu")
        )
        if optimizer == "adamw":
            return adamw
        if optimizer != "muon":
            raise ValueError(f"optimizer {optimizer!r}: not adamw or muon")
        muon = torch.optim.Muon(
            [p for p in params if id(p) in hidden],
            lr=learning_rate,
            weight_decay=weight_decay,  # momentum: Muon's 0.95, Nesterov
            adjust_lr_fn="match_rms_adamw",
        )
        return Optimizers(muon, adamw)

    def flops_per_token(self) -> int:
        """Training FLOPs (forward + backward) per token, PaLM appendix B.

        6N for the parameter matmuls plus 12*L*H*Q*T for attention, with N the
        non-embedding parameter count (nanoGPT's convention: a position-embedding
        lookup is no matmul) and T the full block_size, i.e. the model is assumed to
        train on full-length sequences.
        """
        cfg = self.config
        n_params = self.num_params(non_embedding=True)
        head_size = cfg.n_embd // cfg.n_head
        return 6 * n_params + 12 * cfg.n_layer * cfg.n_head * head_size * cfg.block_size

    def estimate_mfu(self, tokens_per_second: float, peak_flops: float) -> float:
        """Model FLOPs utilisation: achieved training FLOP/s as a fraction of ``peak_flops``."""
        return self.flops_per_token() * tokens_per_second / peak_flops

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Extend the (B, T) prompt ``idx`` by up to ``max_new_tokens`` tokens.

        ``temperature`` 0 decodes greedily (``top_k``/``top_p`` are then irrelevant).
        Otherwise logits are divided by the temperature, filtered to the ``top_k``
        most likely tokens, then to the smallest set whose probability reaches
        ``top_p``, and sampled with ``generator`` so a seeded generator reproduces
        the output. Once a row emits ``eos_token_id`` it keeps emitting it, and
        generation stops as soon as every row has. Returns prompt plus new tokens.
        """
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")

        finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)  # (B,)
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.config.block_size :]
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :]  # (B, V)
            if temperature == 0:
                idx_next = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    logits = _keep_top_k(logits, top_k)
                if top_p is not None:
                    logits = _keep_top_p(logits, top_p)
                probs = F.softmax(logits, dim=-1)
                idx_next = torch.multinomial(probs, num_samples=1, generator=generator)

            if eos_token_id is not None:
                idx_next = idx_next.masked_fill(finished.unsqueeze(1), eos_token_id)
                finished |= idx_next.squeeze(1) == eos_token_id
            idx = torch.cat((idx, idx_next), dim=1)
            if eos_token_id is not None and bool(finished.all()):
                break
        return idx


def _keep_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set every logit below the k-th largest of its row to -inf; ties are kept."""
    kth_largest = torch.topk(logits, min(k, logits.size(-1))).values[:, [-1]]  # (B, 1)
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def _keep_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the most likely tokens until their mass reaches p."""
    sorted_logits, sorted_indices = torch.sort(logits, dim=-1, descending=True)
    sorted_probs = F.softmax(sorted_logits, dim=-1)
    # Mass strictly before each token; the most likely token has 0 and always survives.
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_logits = sorted_logits.masked_fill(mass_before >= p, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, sorted_indices, sorted_logits)


def measure_matmul_peak_flops(
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    n: int = 1024,
    repeats: int = 5,
) -> float:
    """Best FLOP/s observed over ``repeats`` timed (n, n) @ (n, n) matmuls.

    A practical denominator for ``GPT.estimate_mfu`` when the datasheet peak is
    unknown or unrealistic (CPUs). The defaults take well under a second on a CPU
    core; on a GPU pass a larger ``n`` (e.g. 8192), as 1024 is launch-bound there.
    """
    device = torch.device(device)
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)

    def synchronize() -> None:
        # Accelerator kernels run asynchronously; without this we would time the launch.
        if device.type != "cpu":
            torch.accelerator.synchronize(device)

    a @ b  # warm-up: allocator, kernel selection and lazy initialisation
    synchronize()
    best_seconds = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        synchronize()
        best_seconds = min(best_seconds, time.perf_counter() - start)
    return 2 * n**3 / best_seconds


class Optimizers:
    """Several optimizers over disjoint parameters, stepped, zeroed and saved as one (Muon for
    the hidden matrices beside AdamW for the rest). What the training loop and GradScaler use
    of an optimizer: param_groups (the schedule sets each group's lr), step, zero_grad and the
    state dict."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [group for o in self.optimizers for group in o.param_groups]

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        for o, s in zip(self.optimizers, state["optimizers"], strict=True):
            o.load_state_dict(s)
