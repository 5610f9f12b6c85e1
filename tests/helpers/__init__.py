"""Plain helpers the test modules share (no test module imports another; fixtures stay in conftest.py).

``models``: tiny random models and tolerances; ``kernels``: expert-op problems and checks; ``hub``: PEFT
adapters for fusion tests; ``cli``: composing and running the commands; ``lightning``: small training rigs.
"""
