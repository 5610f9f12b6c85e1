"""How many experts (and which rank) each MoLE layer gets: fixed schedules (:mod:`.plan`), the budget
split (:mod:`.budget`) and the automatic allocation from a warm-up (:mod:`.auto`)."""
