"""Parameter server for classifier rows: numpy + pyzmq, never torch.

Start a server with ``python paramserver/paramserver.py``; talk to it with
:class:`paramserver.ParamClient`. The wire protocol is in ``paramserver/PROTOCOL.md``.
"""
from .client import ParamClient, ParamServerError
from .optim import NonFiniteUpdateError, SGDConfig, reduce_duplicate_rows, sgd_rows
from .table import Table

__all__ = ["ParamClient", "ParamServerError", "NonFiniteUpdateError", "SGDConfig", "Table",
           "reduce_duplicate_rows", "sgd_rows"]
