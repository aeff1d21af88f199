"""The offline demo and the tiny model families it and the tests merge."""
