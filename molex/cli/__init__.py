"""Hydra entry points: ``molex-train`` (:mod:`molex.cli.train`), ``molex-eval`` (:mod:`molex.cli.eval`)
and ``molex-fuse`` (:mod:`molex.cli.fuse`)."""
