"""molex's Hydra configs (``train.yaml``, ``eval.yaml``, ``fuse.yaml`` and the groups beside them).

This file must exist. The entry points declare ``config_path="../conf"``, which Hydra resolves,
relative to the ``molex.cli`` package, to the *Python package* ``molex.conf`` and reads through
``importlib.resources``. Without this file the folder is at best a namespace package, which an
installed console script (editable or from a wheel) cannot find: ``molex-train`` then stops at once
with "Primary config module 'molex.conf' not found". The YAML files ship as package data
(``pyproject.toml``); ``tests/test_user_path.py`` runs the installed scripts and a built wheel.
"""
