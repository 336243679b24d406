"""Ray, the one optional engine for going past one machine: connect to a cluster, and map a function over items.

Ray is an extra (``pip install 'protege[ray]'``). This module and :mod:`protege.stages.generate_ray` are the only
ones that import it, and only inside functions: without Ray installed, or with it off, everything here runs
serially in this process (:func:`map_tasks` with ``ray=None``), so code that *can* fan out never has two paths.

Where the cluster is: ``address`` when given ("local" starts one in-process; "auto" joins the one ``ray start``
made on this machine; ``ray://head:10001`` joins a remote head), else ``$RAY_ADDRESS``, else a local cluster.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

INSTALL = "Ray is not installed: pip install 'protege[ray]' (or run without --ray / teacher.engine: ray)"


def ray_module():
    """The ``ray`` module, or a :class:`~protege.errors.TaskError` that says how to install it."""
    try:
        import ray
    except ImportError:
        from protege.errors import TaskError

        raise TaskError(INSTALL) from None
    return ray


def connect(address: str | None = None, *, num_cpus: int | None = None):
    """Join (or start) a Ray cluster once per process; returns the ``ray`` module.

    Already connected (a test module's cluster, a notebook's ``ray.init``): that cluster is used as it is.
    Workers get this process's ``PYTHONPATH`` and working directory on a local cluster; on a real cluster
    protege must be installed on every node (the same version: requests must hash to the same ledger keys).
    """
    ray = ray_module()
    if ray.is_initialized():
        return ray
    kw: dict[str, Any] = {"include_dashboard": False, "logging_level": "ERROR", "log_to_driver": False,
                          "configure_logging": True}
    addr = address or os.environ.get("RAY_ADDRESS") or None
    if addr in (None, "", "local"):
        ray.init(address="local", num_cpus=num_cpus, **kw)
    else:
        ray.init(address=addr, **kw)
    return ray


def map_tasks(fn: Callable[[Any], Any], items: Sequence[Any], *, ray: Any = None, num_cpus: float = 1,
              max_retries: int = 2) -> list[Any]:
    """``[fn(x) for x in items]``: serially here when ``ray`` is None, else as Ray tasks (one per item, results in
    order). ``fn`` must be importable on the workers (a module-level function); its exceptions are re-raised
    here as themselves, not as Ray's wrapper. A task whose worker dies is retried ``max_retries`` times."""
    if ray is None or len(items) < 2:
        return [fn(x) for x in items]
    remote = ray.remote(num_cpus=num_cpus, max_retries=max_retries)(fn)
    refs = [remote.remote(x) for x in items]
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        raise unwrap(e) from None


def unwrap(e: BaseException) -> BaseException:
    """The exception a Ray task raised (Ray wraps it in ``RayTaskError``), else ``e`` itself."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e
