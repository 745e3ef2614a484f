"""How the app answers a refused request: an HTTP status with the reason as its ``detail``, and what an uploaded file
looks like."""

import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

from fastapi import HTTPException

from medssl.data import DataError


def refuse(e: DataError, names: Optional[Dict[str, str]] = None) -> HTTPException:
    """The HTTP answer to a refused request: its status (422 for bad data) and its reason as ``detail``, with the
    server's temporary file names replaced by what they are to the client (``names``)."""
    detail = " ".join(str(e).split())
    for path, name in (names or {}).items():
        detail = detail.replace(path, name)
    return HTTPException(status_code=getattr(e, "status", 422), detail=detail)


def is_upload(value: Any) -> bool:
    """Whether ``value`` is the path MONAI Label's endpoints give an uploaded file (``tempfile.NamedTemporaryFile``
    names in the temporary folder)."""
    return (
        isinstance(value, str)
        and os.path.dirname(os.path.realpath(value)) == os.path.realpath(tempfile.gettempdir())
        and Path(value).name.startswith("tmp")
        and os.path.isfile(value)
    )


def causes(exc: BaseException):
    """``exc``, then what caused it (``__cause__``, else ``__context__``), and so on down the chain, each once."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__
