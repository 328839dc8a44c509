"""PEFT tuners of peft-mole: one folder per method (config, layers, tuner model)."""
