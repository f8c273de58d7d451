"""Twisted plugin package of message checks (``pipeline.ICheckFactory``).

``pipeline.factories`` asks ``twisted.plugin.getPlugins`` for every
ICheckFactory in the modules of this package and of every other
``mailstack/plugins/`` directory on ``sys.path`` (one without an
``__init__.py``): drop a module there and name its check in
``[pipeline] checks``.  README, "Writing a check", has an example.
"""

from twisted.plugin import pluginPackagePaths

__path__.extend(pluginPackagePaths(__name__))
__all__: list[str] = []
