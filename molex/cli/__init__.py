"""Hydra entry points: ``molex-train`` (:mod:`molex.cli.train`) and ``molex-eval`` (:mod:`molex.cli.eval`)."""
