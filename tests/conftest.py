import json
import os

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars are for people, not test logs
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llmpipe.smoke import MICRO_SHAPES

ROOT = Path(__file__).resolve().parents[1]
# Files a copy of the project needs to run the pipeline (data/ and metrics/ are outputs).
PROJECT_FILES = (
    "dvc.yaml",
    "params.yaml",
    "metrics/task_control.json",  # the report card reads it (recorded by llmpipe.control)
    "pyproject.toml",
    "stages",
    "src",
    ".dvcignore",
    ".gitignore",
)

SAMPLE_DOCS = [
    "Return the sum of a and b.\n\nBoth arguments must be numbers.",
    "A class that holds a mutable sequence of items, like list() does.",
    "Open a file and return a stream. Raise OSError upon failure.",
    "Ünïcödé text — with dashes, “quotes” and emoji 🐍 must round-trip.",
    "    indented code:\n        x = f(y)  # comment\n\ttabs too",
    "Numbers 12345 and 3.14159, hex 0xFF, and symbols <>&%$#@!",
] * 3 + [f"Document number {i} talks about topic {i % 7}." for i in range(40)]


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for child processes: this venv first on PATH, one thread each (2 cores)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{ROOT / 'src'}"
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run(cmd: list[str], cwd: Path, check: bool = True, **env: str):
    result = subprocess.run(cmd, cwd=cwd, env=subprocess_env(**env), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


def make_project(repo: Path) -> Path:
    """A fresh git + DVC repository at repo holding a copy of the project's pipeline files."""
    repo.mkdir()
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(
                src, repo / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
            )
        elif src.exists():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, repo / name)
    run(["git", "init", "-q", "-b", "main"], repo)
    run(["git", "config", "user.email", "test@llmpipe.local"], repo)
    run(["git", "config", "user.name", "llmpipe test"], repo)
    run(["dvc", "init", "-q"], repo)
    shutil.copy2(ROOT / ".dvc/config", repo / ".dvc/config")  # remote and cache link type
    return repo


@pytest.fixture
def project_copy(tmp_path: Path) -> Path:
    """A fresh git + DVC repository holding a copy of the project's pipeline files."""
    return make_project(tmp_path / "repo")


def set_params(repo: Path, updates: dict) -> None:
    """Apply dotted-key updates to repo/params.yaml, keeping the rest."""
    from ruamel.yaml import YAML

    from llmpipe.preset import set_dotted

    yaml = YAML()
    path = repo / "params.yaml"
    data = yaml.load(path.read_text())
    for dotted, value in updates.items():
        set_dotted(data, dotted, value)
    with open(path, "w") as f:
        yaml.dump(data, f)


def git_commit_all(repo: Path, message: str = "state") -> None:
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-q", "-m", message], repo)


# A micro configuration of the whole pipeline (smoke.MICRO_SHAPES: seconds per stage on 2 CPU
# cores), with what the tests need besides: more finetuning steps, one timing repeat, a fixed
# peak for MFU, a few harness items.
MICRO_PARAMS = {
    **MICRO_SHAPES,
    **{
        f"{stage}.{key}": value
        for stage in ("finetune", "lora")
        for key, value in {"max_steps": 20, "eval_interval": 10}.items()
    },
    "pretrain.peak_flops": 1.0e11,
    "quantize.repeats": 1,
    "preferences.pairs_per_prompt": 1,
    "reward_model.epochs": 1,
    "evaluate.repeats": 1,
    "evaluate.harness_limit": 8,
}


@pytest.fixture(scope="session")
def micro_workspace(tmp_path_factory) -> Path:
    """A directory with params.yaml (micro) and the outputs of download and tokenize."""
    workspace = tmp_path_factory.mktemp("workspace")
    shutil.copy2(ROOT / "params.yaml", workspace / "params.yaml")
    set_params(workspace, MICRO_PARAMS)
    for stage in ("download", "tokenize"):
        run(["python", "-m", f"stages.{stage}"], workspace)
    return workspace


@pytest.fixture(scope="session")
def micro_pretrained(micro_workspace) -> Path:
    """micro_workspace with the pretrain stage's model (data/pretrain/model) as well."""
    run(["python", "-m", "stages.pretrain"], micro_workspace)
    return micro_workspace


def write_toy_preferences(repo: Path) -> dict:
    """A ready preference set (a micro model's own samples all tie on sentiment); returns the
    micro params that read it."""
    rows = [
        {"prompt": f"Item {i} is", "chosen": " good and useful", "rejected": " bad and broken"}
        for i in range(40)
    ]
    (repo / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {
        **MICRO_PARAMS,
        "preferences.source": "file:prefs.jsonl",
        "preferences.heldout_fraction": 0.2,
        "finetune.grad_accum_steps": 2,  # two processes can share it (tests/test_executors.py)
    }


@pytest.fixture(scope="session")
def micro_repro(tmp_path_factory) -> tuple[Path, str]:
    """The whole micro pipeline reproduced once and committed, with `dvc repro`'s output: the
    end-to-end DVC tests start from copies of it (reproduced_project) instead of each running
    the chain again (about 2 minutes a time here)."""
    repo = make_project(tmp_path_factory.mktemp("reproduced") / "repo")
    set_params(repo, write_toy_preferences(repo))
    output = run(["dvc", "repro"], repo).stdout
    git_commit_all(repo, "micro pipeline")
    return repo, output


@pytest.fixture
def reproduced_project(micro_repro, tmp_path: Path) -> Path:
    """A copy of micro_repro's repository, its own to change (git, DVC cache and workspace).
    `cp -a` keeps the hard links between the cache and the workspace; DVC's temporary state
    (per-path hashes keyed by inode) is left behind and rebuilt."""
    repo = tmp_path / "repo"
    subprocess.run(["cp", "-a", str(micro_repro[0]), str(repo)], check=True)
    shutil.rmtree(repo / ".dvc/tmp", ignore_errors=True)
    return repo


TOY_WORDS = ["value", "object", "return", "list", "the", "file", "name", "of", "a", "is"]


def toy_pairs(seed: int, n: int) -> list[dict]:
    """Preference pairs a reward model can separate: chosen ends in ' yes', rejected in ' no',
    after the same random filler."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        prompt = " ".join(rng.choice(TOY_WORDS) for _ in range(4))
        filler = " " + " ".join(rng.choice(TOY_WORDS) for _ in range(rng.randint(1, 5)))
        pairs.append({"prompt": prompt, "chosen": filler + " yes", "rejected": filler + " no"})
    return pairs


# A chat template in the style of ChatML, for a micro model that speaks /v1/chat/completions.
MICRO_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def save_micro_model(
    directory: Path, seed: int = 0, n_positions: int = 512, chat_template: str | None = None
):
    """A random-init GPT-2 (2 x 32) with a byte-level BPE trained on SAMPLE_DOCS, saved as a
    Hugging Face model directory (safetensors): seconds, no pipeline run. Returns the model."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from llmpipe.data.tokenization import train_bpe

    tokenizer = train_bpe(SAMPLE_DOCS, vocab_size=400, min_frequency=1)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    eot = tokenizer.eos_token_id
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
    )
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model


# A template in the style of Llama 3's and Qwen's: it writes the BOS, a system header with
# today's date unless given one (as Llama 3's does), and ends each turn with <|eot|> (the
# tokenizer's EOS, as an instruct model's end of turn is) and a newline (as Qwen's does).
INSTRUCT_CHAT_TEMPLATE = (
    "{{ bos_token }}<|start|>system\nToday: {{ date_string if date_string is defined else "
    "strftime_now('%H:%M:%S.%f') }}<|eot|>\n"
    "{% for m in messages %}<|start|>{{ m['role'] }}\n{{ m['content'] }}<|eot|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|start|>assistant\n{% endif %}"
)


def save_micro_instruct(directory: Path, architecture: str = "llama", seed: int = 0):
    """A random-init Llama or Qwen2 (2 x 32) with a tokenizer like an instruct model's: a
    byte-level BPE trained on SAMPLE_DOCS that adds a BOS to every text, <|eot|> as EOS, a
    chat template, and as pad token none (Llama) or <|endoftext|> (Qwen, whose tokenizer class
    AutoTokenizer picks from the config adds it). Returns (model, tokenizer)."""
    import torch
    from tokenizers import ByteLevelBPETokenizer, processors
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        SAMPLE_DOCS,
        vocab_size=400,
        min_frequency=1,
        special_tokens=["<s>", "<|eot|>", "<|start|>", "<|endoftext|>"],
        show_progress=False,
    )
    backend = bpe._tokenizer
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)]
    )
    pad = {"pad_token": "<|endoftext|>"} if architecture == "qwen2" else {}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="<|eot|>",
        chat_template=INSTRUCT_CHAT_TEMPLATE,
        **pad,
    )
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    small = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        **ids,
    )
    torch.manual_seed(seed)
    model = (
        LlamaForCausalLM(LlamaConfig(**small))
        if architecture == "llama"
        else Qwen2ForCausalLM(Qwen2Config(**small))
    ).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model, tokenizer


# The browser tests (the serving page, the offline plots): Debian's Chromium, driven by
# Playwright (whose own browser download needs a host these machines cannot reach).
def browser_path() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    if os.environ.get("CI") == "true":
        pytest.fail(
            "no Chromium on PATH: the browser test must run in CI (.ci/run installs "
            "Debian's chromium)"
        )
    pytest.skip("no Chromium on PATH (apt-get install -y chromium)")
