"""Where bytes live: a local path or any fsspec URL -> (filesystem, path), and URLs shown to people.

This is the only module that turns URLs into filesystems; everything above it (data, checkpoint,
engine) takes what ``resolve`` returns.  Credentials come from the environment or
``storage_options``, never from the URL itself when it is shown: ``redact`` is the one place that
formats a URL for humans (log lines, errors, metrics, summaries).
"""

from __future__ import annotations

import re
from typing import Any

import fsspec

# scheme://user-info@host, anywhere in a text: a token alone, user:password, and passwords with '/' in them.
_USER_INFO = re.compile(r"(?<![a-zA-Z0-9+.-])([a-zA-Z][a-zA-Z0-9+.-]*://)(?:[^@/?#\s]*:[^@\s]*|[^@/?#:\s]+)@")
# Query parameters that carry secrets in presigned or SAS URLs.
_SECRET_QUERY = re.compile(r"(?i)([?&](?:x-amz-signature|x-amz-credential|x-amz-security-token|sig|signature|"
                           r"token|access_token|key|secret|password)=)[^&]*")


def resolve(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """(filesystem, path without a trailing slash) for a local path or fsspec URL."""
    try:
        fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    except ValueError as e:  # fsspec: "Protocol not known: x"
        raise ValueError(f"{redact(url)}: {e}; use a local path or a file://, s3://, gs:// or memory:// URL") from None
    except ImportError as e:  # the protocol's package is not installed
        raise ValueError(f"{redact(url)}: {str(e).splitlines()[0]}; install moe-train[s3] for s3:// or "
                         "moe-train[gcs] for gs://") from None
    return fs, root.rstrip("/") or root


def is_local(fs: Any) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def display(fs: Any, path: str) -> str:
    """A path as a person should see it: local paths as they are, others with their scheme."""
    return path if is_local(fs) else redact(fs.unstrip_protocol(path))


def redact(url: str) -> str:
    """``url`` (or a text with URLs in it) with user-info and secret query parameters replaced by ``***``."""
    url = _USER_INFO.sub(r"\1***@", url)
    return _SECRET_QUERY.sub(r"\1***", url)


def redact_all(obj: Any) -> Any:
    """``obj`` with every string in it redacted: records, summaries and recipes before they are stored."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: redact_all(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_all(v) for v in obj)
    return obj
