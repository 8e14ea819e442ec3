"""Prompt -> umT5 features: Wan's tokenizer handling plus an on-disk prompt-embedding cache.

Upstream (Wan-Video/Wan2.1 `wan/modules/t5.py` `T5EncoderModel`, `wan/modules/tokenizers.py`): the
`google/umt5-xxl` tokenizer with 'whitespace' cleaning (ftfy.fix_text, HTML-unescape twice, strip,
collapse whitespace runs to one space), special tokens added (`</s>` at the end), padded / truncated to
text_len = 512 with an attention mask; the encoder runs on all 512 positions with that mask and its
output is cut to the real token count. The DiT zero-pads the features back to 512 itself.

Cache: one `.npy` per prompt (`[L, dim]` float32, L = real token count) under the cache folder, named
sha256(prompt ‖ encoder identity); the identity hashes the converted parameters, the config, the compute
dtype, text_len and the tokenizer files, so a changed model never serves stale features. Files are
written to a temporary name and renamed into place (atomic).
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import os
import tempfile
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from wm_jax.io import checkpoint as ckpt
from wm_jax.io.hub import hub_cli_command
from wm_jax.models.umt5 import UMT5Encoder

log = logging.getLogger(__name__)

TOKENIZER_REPO = "google/umt5-xxl"
# What a local tokenizer folder may hold (tokenizer.json or spiece.model is required).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model")
TEXT_LEN = 512


class TokenizerNotFoundError(FileNotFoundError):
    pass


# ---------------------------------------------------------------------------------------------------
# Text cleaning (upstream 'whitespace' mode).
# ---------------------------------------------------------------------------------------------------

try:  # upstream uses the `regex` package; its \s is the Unicode White_Space property
    import regex as _re
except ImportError:  # pragma: no cover - regex ships with transformers
    import re as _re

_warned_ftfy = False


def _fix_text(text: str) -> str:
    global _warned_ftfy
    try:
        import ftfy
    except ImportError:
        if not _warned_ftfy:
            log.warning("ftfy is not installed: prompt cleaning skips ftfy.fix_text (upstream applies it; "
                        "it changes e.g. curly quotes and mojibake). pip install ftfy for exact upstream tokens.")
            _warned_ftfy = True
        return unicodedata.normalize("NFC", text)
    return ftfy.fix_text(text)


def clean_prompt(text: str) -> str:
    """Upstream 'whitespace' cleaning: ftfy.fix_text, html.unescape twice, strip, whitespace runs -> ' '."""
    text = html.unescape(html.unescape(_fix_text(text))).strip()
    return _re.sub(r"\s+", " ", text).strip()


# ---------------------------------------------------------------------------------------------------
# Tokenizer.
# ---------------------------------------------------------------------------------------------------


def find_tokenizer_folder(path: Path) -> Path | None:
    """`path`, `path/google/umt5-xxl` or `path/tokenizer`, whichever holds tokenizer.json or spiece.model."""
    for folder in (path, path / "google" / "umt5-xxl", path / "tokenizer"):
        if folder.is_dir() and ((folder / "tokenizer.json").is_file() or (folder / "spiece.model").is_file()):
            return folder
    return None


def _missing_message(where: str) -> str:
    return (f"{where}: no umT5 tokenizer found. Download the tokenizer files of the Hugging Face repo "
            f"{TOKENIZER_REPO} ({', '.join(TOKENIZER_FILES)}), e.g. "
            f"`{hub_cli_command(TOKENIZER_REPO, TOKENIZER_FILES, local_dir='<folder>')}`, and pass that folder "
            f"(Wan checkpoints ship it as `google/umt5-xxl/` inside the model folder).")


def resolve_tokenizer_folder(path: str | os.PathLike | None) -> Path:
    """A local folder, or (path None) the hub snapshot of google/umt5-xxl's tokenizer files."""
    if path is not None:
        folder = find_tokenizer_folder(Path(path))
        if folder is None:
            raise TokenizerNotFoundError(_missing_message(str(path)))
        return folder
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise TokenizerNotFoundError(_missing_message("huggingface_hub not installed")) from None
    try:
        folder = Path(snapshot_download(TOKENIZER_REPO, allow_patterns=list(TOKENIZER_FILES)))
    except Exception as err:  # noqa: BLE001 - offline, gated, network errors: all end the same way
        raise TokenizerNotFoundError(_missing_message(f"hub download failed ({type(err).__name__})")) from None
    found = find_tokenizer_folder(folder)
    if found is None:
        raise TokenizerNotFoundError(_missing_message(str(folder)))
    return found


class UMT5Tokenizer:
    """Prompts -> (ids `[B, text_len]` int32, mask `[B, text_len]` int32, 1 = real token).

    Uses transformers' AutoTokenizer on the folder (as upstream) when transformers is installed, else the
    `tokenizers` library on `tokenizer.json` with the same padding/truncation.
    """

    def __init__(self, folder: str | os.PathLike | None = None, text_len: int = TEXT_LEN, clean: bool = True):
        self.folder = resolve_tokenizer_folder(folder)
        self.text_len = text_len
        self.clean = clean
        self._hf = None
        self._fast = None
        try:
            from transformers import AutoTokenizer
        except ImportError:
            AutoTokenizer = None
        if AutoTokenizer is not None:
            self._hf = AutoTokenizer.from_pretrained(str(self.folder))
        else:
            if not (self.folder / "tokenizer.json").is_file():
                raise TokenizerNotFoundError(
                    f"{self.folder}: without transformers installed, tokenizer.json is required "
                    f"(from {TOKENIZER_REPO}); or pip install transformers")
            from tokenizers import Tokenizer
            tok = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
            pad_id = tok.token_to_id("<pad>")
            if pad_id is None:
                raise TokenizerNotFoundError(f"{self.folder}/tokenizer.json has no <pad> token")
            tok.enable_truncation(max_length=text_len)
            tok.enable_padding(length=text_len, pad_id=pad_id, pad_token="<pad>")
            self._fast = tok
        self.digest = self._files_digest()

    def _files_digest(self) -> str:
        h = hashlib.sha256()
        for name in TOKENIZER_FILES:
            path = self.folder / name
            if path.is_file():
                h.update(name.encode() + b"\0" + path.read_bytes())
        return h.hexdigest()

    def __call__(self, prompts: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(prompts, str):
            prompts = [prompts]
        texts = [clean_prompt(p) if self.clean else p for p in prompts]
        if self._hf is not None:
            enc = self._hf(texts, padding="max_length", truncation=True, max_length=self.text_len,
                           add_special_tokens=True, return_attention_mask=True)
            ids, mask = enc["input_ids"], enc["attention_mask"]
        else:
            encs = self._fast.encode_batch(texts, add_special_tokens=True)
            ids, mask = [e.ids for e in encs], [e.attention_mask for e in encs]
        return np.asarray(ids, np.int32), np.asarray(mask, np.int32)


# ---------------------------------------------------------------------------------------------------
# Encoder + cache.
# ---------------------------------------------------------------------------------------------------


def module_digest(model: UMT5Encoder) -> str:
    """sha256 of a module's parameters (the manifest's `params_sha256` of a converted folder)."""
    return ckpt.params_digest(ckpt.flat_params(model))


@nnx.jit
def _encode(model: UMT5Encoder, ids: jax.Array, mask: jax.Array) -> jax.Array:
    return model(ids, mask).astype(jnp.float32)


class TextEncoder:
    """umT5 encoder + tokenizer + optional prompt cache.

    `encode(prompts)` returns one float32 array `[L_i, dim]` per prompt (L_i = its real token count,
    special tokens included, at most text_len). `converters.umt5.load_text_encoder` builds one from a
    converted folder.
    """

    def __init__(self, model: UMT5Encoder, tokenizer: UMT5Tokenizer, *, cache_dir: str | os.PathLike | None = None,
                 params_sha256: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.config = model.config
        params_sha256 = params_sha256 or module_digest(model)
        ident = {"params_sha256": params_sha256, "config": model.config.to_dict(),
                 "compute_dtype": jnp.dtype(model.compute_dtype).name, "text_len": tokenizer.text_len,
                 "tokenizer": tokenizer.digest, "clean": tokenizer.clean}
        self.identity = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
        self.encoder_calls = 0

    def cache_key(self, prompt: str) -> str:
        return hashlib.sha256(prompt.encode("utf-8") + b"\0" + self.identity.encode()).hexdigest()

    def _cache_path(self, prompt: str) -> Path | None:
        return self.cache_dir / f"{self.cache_key(prompt)}.npy" if self.cache_dir is not None else None

    def _run_encoder(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """ids, mask `[B, text_len]` -> `[B, text_len, dim]` float32."""
        if self.model is None:
            raise RuntimeError("this TextEncoder's model was freed; only cached prompts can be encoded")
        self.encoder_calls += 1
        return np.asarray(_encode(self.model, jnp.asarray(ids), jnp.asarray(mask)))

    def encode(self, prompts: str | Sequence[str]) -> list[np.ndarray]:
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        out: list[np.ndarray | None] = [None] * len(prompts)
        todo = []
        for i, prompt in enumerate(prompts):
            path = self._cache_path(prompt)
            if path is not None and path.is_file():
                try:
                    out[i] = np.load(path, allow_pickle=False)
                    continue
                except (OSError, ValueError):
                    log.warning("unreadable prompt cache entry %s; recomputing", path)
            todo.append(i)
        unique = list(dict.fromkeys(prompts[i] for i in todo))
        if unique:
            ids, mask = self.tokenizer(unique)
            features = self._run_encoder(ids, mask)
            lengths = mask.sum(axis=1)
            computed = {p: np.ascontiguousarray(features[j, : lengths[j]]) for j, p in enumerate(unique)}
            for p, value in computed.items():
                self._store(p, value)
            for i in todo:
                out[i] = computed[prompts[i]]
        return out

    def _store(self, prompt: str, value: np.ndarray) -> None:
        path = self._cache_path(prompt)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, value.astype(np.float32), allow_pickle=False)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def free(self) -> None:
        """Drops the encoder weights (cached prompts still work)."""
        self.model = None
