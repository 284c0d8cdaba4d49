"""Hook specifications for lbw-policy plugins.

A plugin is any module or object with functions marked ``@lbw_policy.hookimpl``. Third-party
packages expose one through the ``lbw_policy`` entry-point group::

    [project.entry-points.lbw_policy]
    my_plugin = "my_package.lbw_plugin"

and the built-in detectors and actuators are registered through exactly the same hooks, as
default plugins (:mod:`lbw_policy.plugins`). Hooks receive a ``register`` callback, the pattern
of simonw/llm: a plugin calls it once per class it provides.
"""

from __future__ import annotations

from typing import Callable

import pluggy

__all__ = ["hookspec", "hookimpl", "register_detectors", "register_actuators"]

hookspec = pluggy.HookspecMarker("lbw_policy")
hookimpl = pluggy.HookimplMarker("lbw_policy")


@hookspec
def register_detectors(register: Callable[[type], None]) -> None:
    """Register detector classes.

    Called once per plugin when the registry is built (first use of a policy, ``lbw-policy
    plugins``, ``lbw-policy validate``), before any model exists.

    :param register: call ``register(cls)`` with a subclass of :class:`lbw_policy.base.Detector`
        for each detector the plugin provides. ``cls.name`` is the ``type`` a policy uses; it
        must be unique across every loaded plugin, or :class:`lbw_policy.errors.PluginError`
        is raised naming both plugins.
    :return: ignored.
    """


@hookspec
def register_actuators(register: Callable[[type], None]) -> None:
    """Register actuator classes.

    Called once per plugin when the registry is built, before any optimizer exists.

    :param register: call ``register(cls)`` with a subclass of :class:`lbw_policy.base.Actuator`
        for each actuator the plugin provides. ``cls.name`` is the key a policy configures under
        ``actuators:`` and rules command; it must be unique across every loaded plugin, or
        :class:`lbw_policy.errors.PluginError` is raised naming both plugins.
    :return: ignored.
    """
