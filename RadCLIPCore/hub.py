"""Models on the Hugging Face hub, without torch: is a model in the local cache, can the hub be
reached, and the one-line errors that say how to fill the cache on an air-gapped machine.
`loading` uses it to fetch; the commands use `check_obtainable` first, so that a model that can
be neither found nor downloaded is refused before torch and transformers are imported.
"""
from __future__ import annotations

import os
import re
import threading
from pathlib import Path

from .errors import RadCLIPError
from .presets import RADCLIP_FILE, RADCLIP_REPO, hub_cache_dir, resolve_preset

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
HUB_PROBE_SECONDS = 5.0  # how long to wait for the hub endpoint before saying it cannot be reached


def offline_mode(offline=None) -> bool:
    """`offline` when given, else $HF_HUB_OFFLINE."""
    if offline is not None:
        return bool(offline)
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def check_obtainable(source, offline=None, cache_dir=None):
    """Refuse now, with loading's own one-line error, a hub model (or the RadCLIP preset's file)
    that is neither in the cache nor downloadable (offline, or the hub does not answer). Local
    paths and everything else pass: `load_model` judges them."""
    source = str(resolve_preset(source))
    if Path(os.path.expanduser(source)).exists():
        return
    offline = offline_mode(offline)
    if source == f"{RADCLIP_REPO}/{RADCLIP_FILE}":
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(RADCLIP_REPO, RADCLIP_FILE, cache_dir=cache_dir), str):
            Fetch.file(RADCLIP_REPO, RADCLIP_FILE, cache_dir).check_possible(offline)
    elif not looks_like_path(source) and HUB_ID.match(source) and cached_snapshot(source, cache_dir) is None:
        Fetch.model(source, cache_dir).check_possible(offline)


def looks_like_path(source: str) -> bool:
    """A missing local path (to report as not found) rather than a hub id."""
    return (source.startswith((".", "/", "~", "\\")) or source.count("/") > 1 or "\\" in source
            or source.lower().endswith((".pth", ".pt", ".bin", ".safetensors", ".json")))


def cached_snapshot(repo: str, cache_dir) -> Path | None:
    """The repo's folder in the HF cache when it holds a config and weights, else None."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, "config.json", cache_dir=cache_dir)
    if not isinstance(found, str):  # None, or the marker for "known not to exist"
        return None
    folder = Path(found).parent
    return folder if any((folder / f).exists() for f in WEIGHT_FILES) else None


def hub_cache(cache_dir) -> str:
    return hub_cache_dir(cache_dir)


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")  # HF_ENDPOINT, as huggingface_hub read it


class Fetch:
    """Getting `what`, which is not in the HF cache, from the hub; every failure is one whole line
    that says where the cache is and how to fill it on a machine with internet."""

    def __init__(self, what, cache_dir, command, otherwise):
        self.what, self.cache_dir, self.command, self.otherwise = what, cache_dir, command, otherwise

    @classmethod
    def model(cls, repo, cache_dir) -> "Fetch":
        """A whole model repository."""
        return cls(f"model '{repo}'", cache_dir, f"hf download {repo}", "pass a local model folder")

    @classmethod
    def file(cls, repo, filename, cache_dir) -> "Fetch":
        """One file of a repository."""
        return cls(f"'{filename}' of '{repo}'", cache_dir, f"hf download {repo} {filename}",
                   f"download it from {endpoint()}/{repo} and pass its path")

    def error(self, why) -> RadCLIPError:
        return RadCLIPError(f"{self.what} is not in the Hugging Face cache ({hub_cache(self.cache_dir)}) and {why}; "
                            f"on a machine with internet run `{self.command}` and copy that cache folder here "
                            f"(or set HF_HOME), or {self.otherwise}")

    def check_possible(self, offline):
        """Refuse at once when nothing can be downloaded: offline mode, or a hub endpoint that does
        not answer. Without the probe the hub client retries for ~30 s, a warning per retry."""
        if offline:
            raise self.error("downloads are off (offline mode)")
        problem = hub_unreachable()
        if problem is not None:
            raise self.error(f"the Hugging Face hub ({endpoint()}) cannot be reached ({problem})")

    def download(self, repo, filename) -> Path:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RemoteEntryNotFoundError

        try:
            return Path(hf_hub_download(repo, filename, cache_dir=self.cache_dir))
        except GatedRepoError:
            why = "the repository is gated: accept its terms on the hub, then log in with `hf auth login`"
        except RepositoryNotFoundError:
            why = "the hub has no such repository (a private one needs `hf auth login`)"
        except RemoteEntryNotFoundError:
            why = f"the repository has no file '{filename}'"
        except Exception as exc:  # huggingface_hub raises many types (network, HTTP, cache, disk)
            raise self.error(f"downloading it from {endpoint()} failed ({first_line(exc)})") from None
        raise RadCLIPError(f"cannot download '{filename}' of '{repo}' from {endpoint()}: {why}")


def hub_unreachable() -> str | None:
    """Why the hub endpoint gives no answer, or None when it answers.

    One HEAD request through huggingface_hub's own HTTP client (its proxies and certificates), in a
    thread, so the wait is bounded by HUB_PROBE_SECONDS even where name resolution itself hangs.
    """
    from huggingface_hub.utils import get_session

    url, outcome = endpoint(), []

    def probe():
        try:
            status = get_session().head(url, timeout=HUB_PROBE_SECONDS + 1, follow_redirects=False).status_code
            outcome.append(None if status < 500 else f"it answered HTTP {status}")
        except Exception as exc:  # no answer, whatever the reason (DNS, refused, TLS, proxy): say which
            outcome.append(first_line(exc))

    worker = threading.Thread(target=probe, name="radclip-hub-probe", daemon=True)
    worker.start()
    worker.join(HUB_PROBE_SECONDS)
    return outcome[0] if outcome else f"no answer within {HUB_PROBE_SECONDS:g} s"


def first_line(exc) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
