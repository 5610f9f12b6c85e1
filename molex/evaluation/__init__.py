"""Evaluation: generation accuracy (:mod:`.generation`), routing analysis (:mod:`.analysis`), hub routing
accuracy (:mod:`.hub`) and the lm-evaluation-harness bridge (:mod:`.harness`, :mod:`.harness_model`)."""
