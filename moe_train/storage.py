"""Where bytes live: a local path or any fsspec URL -> (filesystem, path), and URLs shown to people.

This is the only module that turns URLs into filesystems; everything above it (data, checkpoint,
engine) takes what ``resolve`` returns.  Credentials come from the environment or
``storage_options``, never from the URL itself when it is shown: ``redact`` is the one place that
formats a URL for humans (log lines, errors, metrics, summaries).
"""

from __future__ import annotations

import contextlib
import copy
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any

import fsspec

# scheme://user-info@host, anywhere in a text: a token alone, user:password, and passwords with '/' in them.
_USER_INFO = re.compile(r"(?<![a-zA-Z0-9+.-])([a-zA-Z][a-zA-Z0-9+.-]*://)(?:[^@/?#\s]*:[^@\s]*|[^@/?#:\s]+)@")
# Query parameters that carry secrets in presigned or SAS URLs.
_SECRET_QUERY = re.compile(
    r"(?i)([?&](?:x-amz-signature|x-amz-credential|x-amz-security-token|sig|signature|"
    r"token|access_token|key|secret|password)=)[^&]*"
)
# A secret-like name (HF_TOKEN, AWS_SECRET_ACCESS_KEY, X-Amz-Signature, "key", "password") set to a value,
# in a JSON object ("secret": "..."), a Python dict, or key=value text (an env value such as
# FSSPEC_S3={"key": .., "secret": ..}, a storage option in a log line): the value is replaced.
SECRET_NAME = r"(?:[\w-]*[_-])?(?:secret|token|password|passwd|credentials?|signature|sig|key|apikey)"
_SECRET_VALUE = re.compile(rf"""(?i)((?<![\w-]){SECRET_NAME}(?![\w-])["']?[:=]\s*)("[^"]*"|'[^']*'|[^\s"',;&}}\]]+)""")


# Object-store requests that hang are cut and retried instead of stalling a job for botocore's defaults.
S3_CONFIG = {"connect_timeout": 10, "read_timeout": 120, "retries": {"max_attempts": 8, "mode": "standard"}}


def resolve(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """(filesystem, path without a trailing slash) for a local path or fsspec URL; s3:// gets
    ``S3_CONFIG``'s timeouts and retries unless ``storage_options`` sets ``config_kwargs``."""
    options = dict(storage_options or {})
    if url.startswith(("s3://", "s3a://")):
        # a copy: botocore rewrites the retries dict it is given (max_attempts -> total_max_attempts)
        options.setdefault("config_kwargs", copy.deepcopy(S3_CONFIG))
    try:
        fs, root = fsspec.core.url_to_fs(url, **options)
    except ValueError as e:  # fsspec: "Protocol not known: x"
        raise ValueError(f"{redact(url)}: {e}; use a local path or a file://, s3://, gs:// or memory:// URL") from None
    except ImportError as e:  # the protocol's package is not installed
        raise ValueError(
            f"{redact(url)}: {str(e).splitlines()[0]}; install moe-train[s3] for s3:// or moe-train[gcs] for gs://"
        ) from None
    return fs, root.rstrip("/") or root


def is_local(fs: Any) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def display(fs: Any, path: str) -> str:
    """A path as a person should see it: local paths as they are, others with their scheme."""
    return path if is_local(fs) else redact(fs.unstrip_protocol(path))


def redact(url: str) -> str:
    """``url`` (or a text with URLs in it) with user-info, secret query parameters and the values of
    secret-like keys replaced by ``***``."""
    url = _USER_INFO.sub(r"\1***@", url)
    url = _SECRET_QUERY.sub(r"\1***", url)
    return _SECRET_VALUE.sub(_mask, url)


def _mask(m: re.Match) -> str:
    value = m.group(2)
    quote = value[0] if value[0] in "\"'" else ""
    return f"{m.group(1)}{quote}***{quote}"


@contextlib.contextmanager
def stall_notice(what: str, log: Callable[[str], None], after: float = 60.0) -> Iterator[None]:
    """Log one line when the block takes longer than ``after`` seconds (a stalled object store
    otherwise looks like a hung job), and how long it took in the end."""
    import time

    t0 = time.monotonic()
    timer = threading.Timer(
        after,
        lambda: log(
            f"{what} still running after {after:.0f}s; the storage may be "
            "stalled (fsspec retries; check the endpoint and credentials)"
        ),
    )
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        if time.monotonic() - t0 > after:
            log(f"{what} took {time.monotonic() - t0:.0f}s")


def probe(url: str, what: str = "--model") -> None:
    """Fail with one line, before any work, when ``url`` cannot be reached (an unreachable Hugging Face
    Hub or object store), or names a Hub model without its ``hf://`` scheme."""
    fs, root = resolve(url)
    try:
        fs.info(root)
    except FileNotFoundError:
        if is_local(fs) and "://" not in url and re.fullmatch(r"[\w.-]+/[\w.-]+", url):
            raise ValueError(
                f"{what} {url} is not a local directory; for the Hugging Face Hub model pass "
                f"{what} hf://{url} (or a downloaded copy's directory)"
            ) from None
    except Exception as e:  # noqa: BLE001 - whatever the protocol's client raises for a network failure
        if is_local(fs):
            raise
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
        if url.startswith("hf://"):
            name = url[len("hf://") :]
            raise ValueError(
                f"cannot reach the Hugging Face Hub for {redact(url)} ({reason}); check the network, "
                f"HF_ENDPOINT and HF_TOKEN, or download it first (hf download {name} --local-dir DIR) "
                f"and pass {what} DIR"
            ) from None
        raise ValueError(
            f"cannot reach {display(fs, root)} ({reason}); check the endpoint, network and credentials"
        ) from None


def redact_all(obj: Any) -> Any:
    """``obj`` with every string in it redacted: records, summaries and recipes before they are stored."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: redact_all(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_all(v) for v in obj)
    return obj
