"""Shared fixtures: tiny random Hugging Face models of each supported architecture, written to disk by
transformers itself (so loading them exercises the real checkpoint format), with the bundled tokenizer."""

from __future__ import annotations

import os
import shutil
import weakref
from datetime import datetime
from pathlib import Path

import pytest
import torch

# Triton kernels run on CPU tensors through Triton's interpreter. Read when a kernel is defined (@triton.jit),
# so it must be set before microscale.kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tiny models: torch's intra-op threads cost far more than they save (and thrash on a busy 2-core machine).
torch.set_num_threads(int(os.environ.get("MICROSCALE_TEST_THREADS", "1")))

# On a CPU the engine compiles its forward at start-up (torch.compile), tens of seconds for each new model shape:
# tests run eagerly unless they ask for it (tests/engine/test_compiled_forward.py compiles the real thing). The
# variable is torch's own switch; it reaches the engine processes and CLIs tests start, too.
os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
torch._dynamo.config.disable = os.environ["TORCH_COMPILE_DISABLE"] == "1"

REPO = Path(__file__).resolve().parents[1]
BUNDLED_MODEL = REPO / "models" / "tiny-llama-pycode"
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"]

_BASE = dict(
    vocab_size=4096,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    initializer_range=0.1,  # wide enough that greedy choices are not near-ties
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=0,
    tie_word_embeddings=False,
)


# gpt-oss's shape in miniature: more experts than top-k, a sliding window shorter than the test prompts on
# alternate layers, YaRN RoPE (with the attention factor) from a short original context.
_GPT_OSS = dict(
    intermediate_size=64,
    num_local_experts=4,
    num_experts_per_tok=2,
    sliding_window=8,
    layer_types=["sliding_attention", "full_attention"],
    rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
        "original_max_position_embeddings": 64, "rope_theta": 150000.0, "truncate": False,
    },
)


def _hf_config(arch: str, overrides: dict):
    import transformers

    classes = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "gpt_oss": transformers.GptOssConfig,
    }
    kwargs = dict(_BASE)
    if arch == "mistral":
        kwargs["sliding_window"] = None
    if arch == "gpt_oss":
        kwargs.update(_GPT_OSS)
    kwargs.update(overrides)
    return classes[arch](**kwargs)


def build_tiny_model(
    path: Path, arch: str = "llama", dtype: torch.dtype = torch.float32, max_shard_size: str | None = None, **overrides
) -> Path:
    """Write a random `arch` model with transformers' save_pretrained, plus the bundled tokenizer."""
    import transformers

    torch.manual_seed(0)
    config = _hf_config(arch, overrides)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    for name in TOKENIZER_FILES:
        shutil.copy(BUNDLED_MODEL / name, path / name)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Factory: tiny_model("qwen3", tie_word_embeddings=True) -> folder; built once per distinct spec."""
    built: dict[tuple, Path] = {}

    def make(arch: str = "llama", dtype: torch.dtype = torch.float32, **overrides) -> Path:
        key = (arch, dtype, tuple(sorted((k, repr(v)) for k, v in overrides.items())))
        if key not in built:
            built[key] = build_tiny_model(tmp_path_factory.mktemp(arch), arch, dtype, **overrides)
        return built[key]

    return make


@pytest.fixture(scope="session")
def parity_model(tiny_model, tmp_path_factory):
    """Factory like `tiny_model`, but with every 1-D weight (RMSNorm weights, q/k norms, biases) and every
    bias (gpt-oss experts' are 2-D) randomised: transformers initialises those to exactly 1 or 0, which would
    hide a norm or bias that fails to load."""
    from hf_reference import hf_model

    built: dict[tuple, Path] = {}

    def make(arch: str, dtype: torch.dtype = torch.float32, **overrides) -> Path:
        key = (arch, dtype, tuple(sorted((k, repr(v)) for k, v in overrides.items())))
        if key in built:
            return built[key]
        src = tiny_model(arch, dtype, **overrides)
        model = hf_model(src, dtype)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.dim() == 1 or name.endswith("_bias"):
                    param.add_(0.2 * torch.randn(param.shape, generator=gen).to(param.dtype))
        dst = tmp_path_factory.mktemp(f"{arch}-parity")
        model.save_pretrained(dst)
        for name in TOKENIZER_FILES:
            shutil.copy(src / name, dst / name)
        built[key] = dst
        return dst

    return make


# ---- engine hygiene: no KV block or request outlives a test -------------------------------------------

_ENGINES: weakref.WeakSet = weakref.WeakSet()


def assert_engine_idle(engine) -> None:
    """Every KV block free (ref count 0, on the free list), no request left anywhere, and the prefix cache's
    two maps consistent. Takes an LLMEngine or an LLM."""
    engine = getattr(engine, "engine", engine)
    bm, sched = engine.block_manager, engine.scheduler
    assert not engine.requests, f"requests left: {list(engine.requests)}"
    assert not sched.running and not sched.waiting, f"{len(sched.running)} running, {len(sched.waiting)} waiting"
    in_use = [b for b, c in enumerate(bm.ref_counts) if c != 0]
    assert not in_use, f"KV blocks still referenced: {in_use[:10]}"
    assert bm.num_free_blocks == bm.num_blocks, f"{bm.num_blocks - bm.num_free_blocks} KV blocks leaked"
    for h, block in bm.hash_to_block.items():
        assert bm.block_hash[block] == h, "prefix cache maps disagree"


@pytest.fixture(scope="session", autouse=True)
def _track_engines():
    """Remember every LLMEngine built during the session, with the test module that built it."""
    from microscale.engine.engine import LLMEngine

    original = LLMEngine.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self._test_module = os.environ.get("PYTEST_CURRENT_TEST", "").split("::")[0]
        _ENGINES.add(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LLMEngine, "__init__", init)
        yield


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, f"_report_{report.when}", report)
    return report


@pytest.fixture(autouse=True)
def no_leaked_kv_blocks(request):
    """After each passing test, every engine its module built (module-scoped ones included) must be idle:
    all KV blocks free and no request left, whatever the test did (finish, abort, error)."""
    yield
    module = request.node.nodeid.split("::")[0]
    engines = [e for e in list(_ENGINES) if getattr(e, "_test_module", None) == module]
    report = getattr(request.node, "_report_call", None)
    if report is None or not report.passed:
        # A failed test already says what went wrong; its engines may be left mid-request.
        for engine in engines:
            engine._skip_idle_check = True
        return
    for engine in engines:
        if not getattr(engine, "_skip_idle_check", False):
            assert_engine_idle(engine)


class _PinnedDatetime(datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(2025, 8, 5, 12, 0, 0, tzinfo=tz)


@pytest.fixture
def pinned_chat_date(monkeypatch):
    """Chat templates that print today's date (gpt-oss's) render the same day in microscale and transformers: both
    call datetime.now() through their module's `datetime` name at render time."""
    import transformers.utils.chat_template_utils as hf_chat

    import microscale.tokenizer as ms_tokenizer

    monkeypatch.setattr(ms_tokenizer, "datetime", _PinnedDatetime)
    monkeypatch.setattr(hf_chat, "datetime", _PinnedDatetime)


@pytest.fixture
def assert_idle():
    return assert_engine_idle
